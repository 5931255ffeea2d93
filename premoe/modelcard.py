"""The model card (README.md) of a compiled checkpoint: what it is, where it came from, what was removed.

A compiled checkpoint must not carry the source model's card — it would
describe a model with every expert — nor the source's training artefacts
(loss plots, logs). :func:`compiled_card` writes a Hugging Face model card
instead, with metadata a Hub user filters on (``base_model``,
``pipeline_tag``, ``library_name``, tags) and the premoe provenance: plan
target, scorer and ranking, calibration data and tokens when the plan's
profile is at hand, kept experts per layer, size before and after, and what
became of multi-token-prediction layers. The source's license metadata is
carried over: the base model's license governs its pruned weights.

Example::

    card = compiled_card(write_plan, plan)       # a str: README.md of the output
    ModelCard(card).data.base_model
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from premoe import __version__

TAGS = ["premoe", "moe", "pruned"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+\Z")  # owner/name, as the Hub spells repository ids
_LICENSE_FIELDS = ("license", "license_name", "license_link")

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ source_line }} with routed experts removed by premoe — training-free Mixture-of-Experts
pruning ({{ target_line }}). Every tensor kept is a byte copy of the source's; the checkpoint loads with
`AutoModelForCausalLM.from_pretrained` (and, with one expert count per layer, vLLM).

## What was kept

| | |
|---|---|
| target | {{ target }} |
| scorer / ranking | {{ scorer }} / {{ ranking }} |
| routed experts per MoE layer | {{ counts }} of {{ num_experts }} (export: {{ export }}) |
| checkpoint size | {{ size_before }} → {{ size_after }} ({{ ratio }}) |
| multi-token-prediction layers | {{ mtp }} |
| calibration data | {{ calibration }} |

## Kept experts per layer (original indices; renumbered 0..M-1 in this checkpoint)

| layer | experts |
|---|---|
{{ kept_rows }}

## Provenance

- source: `{{ source_name }}` ({{ model_type }}, config hash `{{ config_hash }}`)
- plan request: `{{ request }}`
- compiled by premoe {{ version }}; the `premoe` block of config.json records all of the above

## Quality

Not measured at compile time. `premoe verify {{ source_name }} <this directory>` proves the checkpoint equals the
source with its routing restricted to the kept experts and reports perplexity and KL against the full model;
`premoe eval` measures it on your data.

## Limitations

{{ limitations }}
"""


def compiled_card(write_plan, plan, base_model: str | None = None) -> str:
    """README.md of a compiled checkpoint, as a Hugging Face model card (YAML metadata + markdown).

    ``base_model`` is the source's Hub id; by default the source config's
    ``_name_or_path`` when it has the Hub's ``owner/name`` form, else none
    (a local path is not a Hub id; the card names the source in its text).
    """
    from premoe.plan import format_ranges

    source = write_plan.config["premoe"]["source"]
    base = base_model or _hub_id(write_plan.config.get("_name_or_path"))
    metadata = {"base_model": base, "library_name": "transformers", **_source_license(write_plan.model_path),
                "pipeline_tag": "text-generation",
                "tags": list(dict.fromkeys([*TAGS, str(source.get("model_type") or write_plan.family)]))}
    counts = sorted({len(v) for v in write_plan.kept.values()})
    size_after = write_plan.bytes_after
    values = dict(
        title=f"{write_plan.out.name}: {write_plan.family} pruned to {'/'.join(map(str, counts))} of "
              f"{write_plan.num_experts} routed experts per MoE layer",
        source_line=f"`{base}`" if base else f"The {write_plan.family} checkpoint `{source['name']}`",
        target_line=_target_line(plan.target),
        target=plan.target, scorer=plan.request.get("scorer"), ranking=plan.request.get("ranking"),
        counts="/".join(map(str, counts)), num_experts=write_plan.num_experts, export=write_plan.export,
        size_before=_gb(write_plan.bytes_before), size_after=_gb(size_after),
        ratio=f"{size_after / max(write_plan.bytes_before, 1):.1%}",
        mtp=(write_plan.mtp.describe() or "none").removeprefix("mtp: ") if write_plan.mtp else "none",
        calibration=_calibration(plan.profile),
        kept_rows="\n".join(f"| {layer} | {format_ranges(v)} |" for layer, v in write_plan.kept.items()),
        source_name=source["name"], model_type=source.get("model_type"), config_hash=source.get("config_hash"),
        request=json.dumps(plan.request, sort_keys=True), version=__version__,
        limitations="\n".join(f"- {line}" for line in _limitations(write_plan, plan)),
    )
    return render_card({k: v for k, v in metadata.items() if v is not None}, values)


def render_card(metadata: dict, values: dict) -> str:
    """:data:`TEMPLATE` filled in: what ``str(ModelCard.from_template(ModelCardData(**metadata), TEMPLATE, **values))``
    returns, without importing huggingface_hub (0.3 s, a fifth of compiling DeepSeek-V3's layout at toy width).

    ``metadata`` holds ModelCardData's fields in its order, None left out. When
    every value is a YAML plain scalar and no text holds a carriage return,
    the card is the template with ``{{ name }}`` replaced by ``str(value)`` (as
    Jinja renders it, the last newline dropped) and the metadata written one
    ``key: value`` / ``- item`` line each (as yaml.dump writes plain scalars);
    anything else goes through huggingface_hub itself.
    """
    scalars = [v for value in metadata.values() for v in (value if isinstance(value, list) else [value])]
    texts = [TEMPLATE, *map(str, values.values())]
    if not all(isinstance(v, str) and _PLAIN.fullmatch(v) and v not in _YAML_WORDS for v in scalars) \
            or any("\r" in t for t in texts):
        return _render_with_hub(metadata, values)
    lines = []
    for key, value in metadata.items():
        lines += [f"{key}:", *(f"- {v}" for v in value)] if isinstance(value, list) else [f"{key}: {value}"]
    fields = {**values, "card_data": "\n".join(lines)}
    return _FIELD.sub(lambda m: str(fields[m.group(1)]), TEMPLATE.removesuffix("\n"))


_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")  # scalars yaml.dump writes bare (Hub ids, tags, license names)
_YAML_WORDS = {w for word in ("yes", "no", "true", "false", "on", "off", "null") for w in (word, word.title(),
                                                                                            word.upper())}
_FIELD = re.compile(r"\{\{ (\w+) \}\}")


def _render_with_hub(metadata: dict, values: dict) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    return str(ModelCard.from_template(ModelCardData(**metadata), template_str=TEMPLATE, **values))


def is_hub_id(name) -> bool:
    """Whether ``name`` has the Hub's ``owner/name`` form (what the card's ``base_model`` must hold)."""
    return _hub_id(name) is not None


def _hub_id(name) -> str | None:
    return name if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).is_absolute() else None


def _source_license(model_path: Path) -> dict:
    """License fields of the source's own card metadata, which bind the pruned weights too.

    The YAML block is found and read as huggingface_hub's ``ModelCard.load`` does (its pattern, ``yaml.safe_load``);
    the license fields are plain strings there, which its card data passes through unchanged.
    """
    readme = model_path / "README.md"
    if not readme.is_file() or not readme.read_text(errors="replace").startswith("---"):
        return {}  # no YAML metadata block (huggingface_hub would log that it found none)
    import yaml

    try:
        match = _YAML_BLOCK.search(readme.read_text(encoding="utf-8"))
        data = yaml.safe_load(match.group(2)) if match else None
    except Exception:  # a card that does not parse simply carries no license metadata  # noqa: BLE001
        return {}
    data = data if isinstance(data, dict) else {}
    return {key: data[key] for key in _LICENSE_FIELDS if isinstance(data.get(key), str)}


_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")  # huggingface_hub's


def _target_line(target: str) -> str:
    kind, _, domains = target.partition(":")
    if kind == "specialist":
        return f"a specialist for `{domains}`"
    if kind == "generalist":
        return f"a generalist over `{domains}`"
    return f"target `{target}`"


def _calibration(profile: str) -> str:
    """Calibration domains and tokens, read from the plan's profile manifest when it is at hand."""
    manifest = Path(profile) / "profile.json" if profile else None
    if manifest is None or not manifest.is_file():
        return "not recorded (the plan's profile is not at hand)"
    try:
        info = json.loads(manifest.read_text())
        domains = info["domains"]
        parts = [f"{name}: {int(d['tokens'])} tokens" for name, d in domains.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"not readable from {manifest}"
    params = info.get("params") or {}
    generated = f", {params['generate']} generated tokens per window" if params.get("generate") else ""
    return "; ".join(parts) + generated + f" (profile `{profile}`)"


def _limitations(write_plan, plan) -> list[str]:
    lines = []
    if plan.target.startswith("specialist:"):
        lines.append(f"Pruned for `{plan.target.partition(':')[2]}`: expect lower quality on other kinds of text.")
    else:
        lines.append("Pruned for the domains of its calibration data; other text may lose more.")
    lines += list(write_plan.notes)  # the compact export's loader, gate changes, ...
    lines.append("The source model's license and use policy apply to these weights.")
    return lines


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def record_verification(path: str | Path, report) -> Path:
    """Replace the Quality section of a compiled checkpoint's card with what ``premoe verify`` measured.

    The card is rewritten atomically (a temp file renamed over README.md);
    everything outside the section stays as compile wrote it.

    >>> record_verification("python-50/", verify("testbed", "python-50/"))
    """
    readme, text, start = check_card(path)
    end = text.find("\n## ", start + 1)
    updated = text[:start] + "\n" + _quality(report) + (text[end:] if end >= 0 else "\n")
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(updated)
    tmp.replace(readme)
    return readme


def check_card(path: str | Path) -> tuple[Path, str, int]:
    """README.md of a compiled checkpoint, its text and where its Quality section starts; an error if it has none.

    ``verify --card`` calls it before verifying, so a card it cannot update fails in seconds, not after the run.
    """
    from premoe.errors import CheckpointError, MissingFileError

    readme = Path(path) / "README.md"
    if readme.exists() and not readme.is_file():
        raise CheckpointError(f"{readme} is not a file; recompile with this premoe to get a model card")
    if not readme.is_file():
        raise MissingFileError(f"{readme} not found; recompile with this premoe to get a model card")
    text = readme.read_text()
    start = text.find("\n## Quality\n")
    if start < 0:
        raise CheckpointError(f"{readme} has no '## Quality' section; was it written by `premoe compile`?")
    return readme, text, start


def _quality(report) -> str:
    """The Quality section for a :class:`premoe.verify.VerifyReport`."""
    verdict = ("PASS: the checkpoint is the source with its routing restricted to the kept experts"
               if report.passed else "FAIL: the checkpoint differs from the source with its routing restricted")
    lines = ["## Quality", "",
             f"Measured by `premoe verify` (premoe {__version__}) against `{report.original}`, in fp32:", "",
             "| data | tokens | max abs Δlogit vs restricted source | ppl source | ppl this model | KL (nats) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {d.name} | {d.tokens} | {d.max_abs_diff:.2e} | {d.ppl_original:.3f} | {d.ppl_compiled:.3f} | "
              f"{d.kl:.4f} |" for d in report.domains]
    lines += ["", f"{verdict} (max |Δlogit| {report.max_abs_diff:.2e}, tolerance {report.tolerance:.0e}).", ""]
    lines += [f"Note: {n}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"
