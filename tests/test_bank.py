"""Expert bank: a swap leaves the resident model exactly the pruned specialist, reading only new experts."""
import os

import pytest
import torch

import tiny
from premoe import pagemap
from premoe.adapters import get_adapter, prune_in_memory
from premoe.bank import ExpertBank
from premoe.errors import InputError, PlanError
from premoe.modeling import load_model

IDS = torch.randint(1, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def random_kept(model, seed: int) -> dict[int, list[int]]:
    """Routable random kept sets: half the experts per layer, or 2 per group for grouped routers."""
    adapter = get_adapter(model.config)
    layers = adapter.moe_layers(model)
    experts, top_k = layers[0].num_experts, adapter.top_k(model.config)
    n_group = adapter.groups(model.config)[0]
    gen = torch.Generator().manual_seed(seed)
    if n_group > 1:
        size = experts // n_group
        return {l.index: sorted(g * size + i for g in range(n_group)
                                for i in torch.randperm(size, generator=gen)[:2].tolist()) for l in layers}
    return {l.index: sorted(torch.randperm(experts, generator=gen)[: max(top_k, experts // 2)].tolist())
            for l in layers}


@torch.no_grad()
def pruned_logits(path, kept) -> torch.Tensor:
    model = load_model(path)
    return prune_in_memory(model, get_adapter(model.config), kept)(IDS).logits


# one family per on-disk layout runs by default; the rest with -m slow
LAYOUTS = {"qwen3_moe",  # per-expert gate/up/down fused into gate_up_proj rows
           "mixtral",  # block_sparse_moe.experts.{e}.w1/w3/w2 on disk
           "gpt_oss",  # fused on disk, interleaved gate/up, expert and router biases
           "llama4_text",  # fused on disk, (E, H, 2I) matmul layout
           "deepseek_v3",  # grouped routing, correction bias, dense first layer
           "ernie4_5_moe",  # correction bias stored (1, E) under another name on disk
           "granitemoe",  # fused experts renamed on disk (input_linear / output_linear)
           "hunyuan_v1_moe"}  # router weight inside a wrapped Linear


@pytest.mark.parametrize("family", [f if f in LAYOUTS else pytest.param(f, marks=pytest.mark.slow)
                                    for f in tiny.FAMILIES])
@pytest.mark.parametrize("cache", ["mapped", "read", None])
def test_swap_equals_the_pruned_specialist(family, cache, tmp_path):
    path = tiny.save(family, tmp_path / family)
    first, second = random_kept(load_model(path), 1), random_kept(load_model(path), 2)
    bank = ExpertBank(path, first, cache=cache and tmp_path / "bank.slots",
                      map_from=pagemap.PAGE if cache == "mapped" else None)  # tiny slices: map even one page
    assert (bank.cache is not None) == (cache is not None)
    assert bank.remapped == (cache == "mapped" and pagemap.available())
    with torch.no_grad():
        assert torch.allclose(bank.model(IDS).logits, pruned_logits(path, first), rtol=0, atol=1e-5)
        bank.swap(second)
        assert torch.allclose(bank.model(IDS).logits, pruned_logits(path, second), rtol=0, atol=1e-5)
        bank.swap(first)  # and back
        assert torch.allclose(bank.model(IDS).logits, pruned_logits(path, first), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache", [True, False])
def test_swap_reads_only_the_experts_that_differ_into_freed_slots(tiny_qwen3, cache, tmp_path):
    bank = ExpertBank(tiny_qwen3, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, cache=tmp_path / "c.slots" if cache else None)
    target = {0: [1, 2, 3, 6], 1: [0, 4, 5, 7]}  # one new expert per layer, into the leaving expert's slot
    planned = sum(length for _, _, length in bank.byte_ranges(target))
    report = bank.swap(target)
    assert report.experts == 2 and report.moved == 0
    assert report.bytes == bank.expert_bytes(0, 6) + bank.expert_bytes(1, 0) == planned
    # expert 6: gate + up + down of (16 x 32) fp32 each, plus its router row of 32 floats
    assert bank.expert_bytes(0, 6) == 3 * 16 * 32 * 4 + 32 * 4
    assert bank.slots == {0: [6, 1, 2, 3], 1: [4, 5, 0, 7]}  # the others stay where they were
    assert bank.kept == target
    again = bank.swap(target)
    assert (again.experts, again.bytes, again.moved) == (0, 0, 0)
    assert bank.totals.experts == 2 and bank.totals.bytes == report.bytes


def test_a_failed_swap_is_repaired_by_the_next(tiny_qwen3, monkeypatch):
    start, target = {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, {0: [4, 5, 6, 7], 1: [4, 5, 6, 7]}
    bank = ExpertBank(tiny_qwen3, start)
    real_load = bank._load
    calls = []

    def failing_load(layer, expert, slot):
        calls.append(expert)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real_load(layer, expert, slot)

    monkeypatch.setattr(bank, "_load", failing_load)
    with pytest.raises(OSError):
        bank.swap(target)
    monkeypatch.setattr(bank, "_load", real_load)
    bank.swap(target)
    with torch.no_grad():
        assert torch.allclose(bank.model(IDS).logits, pruned_logits(tiny_qwen3, target), rtol=0, atol=1e-5)


def test_bad_kept_sets_are_refused(tiny_qwen3):
    bank = ExpertBank(tiny_qwen3, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    with pytest.raises(PlanError, match="one number of experts"):
        bank.swap({0: [0, 1, 2], 1: [0, 1, 2]})
    with pytest.raises(InputError, match="MoE layers \\[1\\]"):
        bank.swap({0: [0, 1, 2, 3]})
    with pytest.raises(PlanError, match="distinct indices"):
        bank.swap({0: [0, 1, 2, 9], 1: [0, 1, 2, 3]})
    with pytest.raises(PlanError, match="one number of experts"):
        ExpertBank(tiny_qwen3, {0: [0, 1, 2, 3], 1: [0, 1, 2]})
    assert bank.kept == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}  # nothing was touched


def test_swap_to_a_stored_domain_equals_its_compiled_specialist(tiny_qwen3, tmp_path):
    import domains
    from premoe.compile import compile_checkpoint
    from premoe.plan import PlanRequest, make_plan

    profile, store = domains.make_store(tiny_qwen3)
    bank = ExpertBank(tiny_qwen3, store.kept("code", 4))
    for domain in ("de", "bible", "code"):
        compiled = tmp_path / domain
        compile_checkpoint(tiny_qwen3, make_plan(profile, PlanRequest(experts=4, domain=domain, scorer=store.scorer)), compiled,
                           progress=False)
        bank.swap(store.kept(domain, 4))
        with torch.no_grad():
            assert torch.allclose(bank.model(IDS).logits, load_model(compiled)(IDS).logits, rtol=0, atol=1e-5)


def test_slot_cache_is_removed_with_the_bank(tiny_qwen3):
    import gc

    import safetensors.torch

    raw = safetensors.torch.load_file(str(tiny_qwen3 / "model.safetensors"))
    bf16 = tiny_qwen3.parent / "bf16"
    bf16.mkdir(exist_ok=True)
    for f in tiny_qwen3.iterdir():
        if f.name != "model.safetensors":
            (bf16 / f.name).write_bytes(f.read_bytes())
    safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in raw.items()}, str(bf16 / "model.safetensors"))
    model = load_model(bf16).float()  # resident fp32, checkpoint bf16: "auto" writes a cache
    bank = ExpertBank(bf16, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, loaded=model)
    assert bank.cache is not None and not bank.cache.path.exists()  # unlinked at once: read through its fd
    ranges = bank.byte_ranges({0: [4, 5, 6, 7], 1: [0, 1, 2, 7]})  # what bench/plain_reads.py opens and reads
    with open(ranges[0][0], "rb") as f:  # /proc/self/fd/N: the nameless file, opened again by this process
        assert len(os.pread(f.fileno(), ranges[0][2], ranges[0][1])) == ranges[0][2]
    bank.swap({0: [4, 5, 6, 7], 1: [0, 1, 2, 7]})
    slot = bank.slots[1].index(7)
    got = bank.layers[1].experts.gate_up_proj[slot].chunk(2, dim=0)[0]  # (I, H) gate rows of expert 7
    want = raw["model.layers.1.mlp.experts.7.gate_proj.weight"].to(torch.bfloat16).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)  # converted once, at start
    fd = bank.cache.fd
    del bank
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the bank: the space is freed


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_the_bank_loads_one_layer_at_a_time_into_exactly_the_pruned_model(family, tmp_path, monkeypatch):
    import transformers

    path = tiny.save(family, tmp_path / family)
    full = load_model(path)
    kept = random_kept(full, 3)
    first = {k: v.clone() for k, v in get_adapter(full.config).moe_layers(full)[0].router.state_dict().items()}
    want = prune_in_memory(full, get_adapter(full.config), kept).state_dict()

    def whole_model(*args, **kwargs):
        raise AssertionError("the bank loaded the whole checkpoint")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", whole_model)
    bank = ExpertBank(path, kept, cache=None)
    got = bank.model.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert bank.model.config.to_dict() == full.config.to_dict()
    router = bank.full_router.state_dict()  # the first router from before pruning: retrieval needs every expert
    assert sorted(router) == sorted(first) and all(torch.equal(router[k], first[k]) for k in first)


@pytest.mark.skipif(not pagemap.available(), reason="page remapping needs Linux 5.14+")
def test_mapped_slots_share_the_cache_pages_and_a_write_never_reaches_the_file(tiny_qwen3, tmp_path):
    bank = ExpertBank(tiny_qwen3, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, cache=tmp_path / "c.slots",
                      map_from=pagemap.PAGE)
    fused = bank.layers[0].experts.gate_up_proj  # (4, 32, 32) fp32: a slot slice is 4096 bytes, one page
    assert bank.remapped and not ExpertBank(tiny_qwen3, bank.kept, cache=tmp_path / "d.slots").remapped  # < 1 MiB
    assert fused.data_ptr() % pagemap.PAGE == 0
    bank.swap({0: [4, 1, 2, 3], 1: [0, 1, 2, 3]})  # expert 4 mapped into slot 0
    raw = (tmp_path / "c.slots").read_bytes()
    offset = bank.cache.offset(0, 4)
    on_disk = torch.frombuffer(bytearray(raw[offset: offset + 4096]), dtype=torch.float32).view(32, 32)
    assert torch.equal(fused[0], on_disk)
    with torch.no_grad():
        fused[0].zero_()  # copy-on-write: the file keeps expert 4
    assert (tmp_path / "c.slots").read_bytes() == raw
    bank.swap({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    bank.swap({0: [4, 1, 2, 3], 1: [0, 1, 2, 3]})
    assert torch.equal(fused[0], on_disk)
    with torch.no_grad():
        assert torch.allclose(bank.model(IDS).logits, pruned_logits(tiny_qwen3, bank.kept), rtol=0, atol=1e-5)


def test_a_failed_mapping_leaves_readable_zeros_and_is_repaired_by_the_next_swap(tiny_qwen3, tmp_path, monkeypatch):
    if not pagemap.available():
        pytest.skip("page remapping needs Linux 5.14+")
    bank = ExpertBank(tiny_qwen3, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, cache=tmp_path / "c.slots",
                      map_from=pagemap.PAGE)
    target = {0: [4, 5, 2, 3], 1: [0, 1, 2, 3]}
    real_fd = bank.cache.fd
    bank.cache.fd = 10_000  # not an open file: mmap fails with EBADF, and so does the read that stands in for it
    with pytest.raises(OSError):
        bank.swap(target)
    slot = bank.slots[0].index(-1)
    assert torch.count_nonzero(bank.layers[0].experts.gate_up_proj[slot]) == 0  # zeros, not an unmapped hole
    bank.cache.fd = real_fd
    bank.swap(target)
    with torch.no_grad():
        assert torch.allclose(bank.model(IDS).logits, pruned_logits(tiny_qwen3, target), rtol=0, atol=1e-5)


def test_a_file_system_that_cannot_map_gets_reads_instead(tiny_qwen3, tmp_path, monkeypatch):
    if not pagemap.available():
        pytest.skip("page remapping needs Linux 5.14+")
    bank = ExpertBank(tiny_qwen3, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, cache=tmp_path / "c.slots",
                      map_from=pagemap.PAGE)
    calls = []

    def cannot_map(tensor, fd, offset):
        calls.append(offset)
        with torch.no_grad():
            tensor.zero_()  # what a failed MAP_FIXED leaves behind
        raise OSError(19, "mmap: no such device")

    monkeypatch.setattr(pagemap, "map_into", cannot_map)
    target = {0: [4, 5, 2, 3], 1: [0, 1, 6, 7]}
    bank.swap(target)
    assert len(calls) == 4  # every entering expert tried to map, then read
    with torch.no_grad():
        assert torch.allclose(bank.model(IDS).logits, pruned_logits(tiny_qwen3, target), rtol=0, atol=1e-5)


def test_the_temporary_slot_cache_leaves_no_file_behind(tmp_path, monkeypatch):
    """cache="auto" (what serve uses: bf16 on disk, fp32 slots) is unlinked as soon as it is created: a server
    stopped by SIGTERM or SIGKILL left /tmp/premoe-bank-*.slots behind; swaps read it through its fd."""
    import tempfile

    from premoe.modeling import resolve_model_path

    testbed = resolve_model_path("testbed")  # stored in bf16: the automatic cache is made
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = {layer: list(range(16)) for layer in range(4)}
    second = {layer: list(range(8, 24)) for layer in range(4)}
    bank = ExpertBank(testbed, first, cache="auto", map_from=pagemap.PAGE)  # slices mapped from the unlinked file
    assert bank.cache is not None and bank.cache.temporary and not list(tmp_path.glob("premoe-bank-*"))
    ids = torch.randint(1, 8192, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bank.swap(second)
        want = load_model(testbed)
        with get_adapter(want.config).restrict_routing(want, second):
            assert torch.allclose(bank.model(ids).logits, want(ids).logits, rtol=0, atol=1e-4)
    fd = bank.cache.fd
    bank.cache.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the space is freed
