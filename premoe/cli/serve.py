"""`premoe serve`: an OpenAI-compatible server, retrieving and swapping experts per request."""
from __future__ import annotations

import click

from premoe.cli.options import POSITIVE, FiniteFloat


@click.command("serve")
@click.argument("model")
@click.option("--store", "store_path", type=click.Path(), help="Pattern store: retrieve a domain per request.")
@click.option("--experts", type=POSITIVE, help="M, resident experts per layer (with --store).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; beyond loopback, set --api-key.")
@click.option("--port", default=8000, type=click.IntRange(1, 65535), show_default=True)
@click.option("--name", help="Model id clients send (default: the model directory's name).")
@click.option("--max-prompt-tokens", default=2048, type=POSITIVE, show_default=True,
              help="Longer prompts are refused (400).")
@click.option("--max-tokens", default=256, type=POSITIVE, show_default=True,
              help="Cap on generated tokens per request (also what max_tokens null means).")
@click.option("--max-queue", default=8, type=POSITIVE, show_default=True,
              help="Requests running or queued, served first come first served; more wait briefly in line for a "
              "slot, then get 429 + Retry-After.")
@click.option("--retrieval-tokens", default=256, type=POSITIVE, show_default=True,
              help="Request tokens retrieval looks at.")
@click.option("--max-body", default=1 << 20, type=click.IntRange(min=1024), show_default=True,
              help="Request body bytes; larger bodies are refused (413) before they are read.")
@click.option("--read-timeout", default=30.0, type=FiniteFloat(min=0.1, max=3600), show_default=True,
              help="Seconds a client may take to send its headers, and again its body; slower ones are cut off.")
@click.option("--api-key", envvar="PREMOE_API_KEY", help="Require 'Authorization: Bearer KEY' (env PREMOE_API_KEY); "
              "/health stays open.")
@click.option("--docs", is_flag=True, help="Serve /openapi.json, /docs and /redoc (off by default).")
def command(model, store_path, experts, host, port, name, max_prompt_tokens, max_tokens, max_queue,
            retrieval_tokens, max_body, read_timeout, api_key, docs) -> None:
    """Serve MODEL over HTTP (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).

    \b
    premoe serve testbed --store store/ --experts 16      # retrieve + swap experts per request
    premoe serve python-50/                               # a compiled specialist, as it is
    PREMOE_API_KEY=... premoe serve python-50/ --host 0.0.0.0
    """
    import uvicorn

    from premoe.errors import InputError
    from premoe.guard import GuardConfig, check_bindable, exposure_warning, loopback_hosts
    from premoe.serve import Engine, ServeLimits, base_url, server_config

    if store_path and experts is None:
        raise InputError("--store needs --experts M (resident experts per layer)")
    if experts is not None and not store_path:
        raise InputError("--experts needs --store; to serve a fixed subset, compile it and serve the compiled dir")
    if api_key is not None and not api_key.strip():
        raise InputError("--api-key (or PREMOE_API_KEY) is empty; give a key or leave it unset")
    if name is not None and name != name.strip():
        raise InputError(f"--name {name!r} has leading or trailing blanks; clients must send the model id exactly")
    check_bindable(host, port)  # before the model loads
    limits = ServeLimits(max_prompt_tokens, max_tokens, max_queue, retrieval_tokens)
    engine = Engine.retrieval(model, store_path, experts, limits, name) if store_path else \
        Engine.fixed_model(model, limits, name)
    guard = GuardConfig(max_body=max_body, read_timeout=read_timeout, api_key=api_key,
                        allowed_hosts=loopback_hosts(host, port))
    warning = exposure_warning(host, api_key)
    if warning:
        click.secho(warning, err=True, fg="red", bold=True)
    click.echo(f"serving {engine.name} on {base_url(host, port)}/v1 "
               f"({'retrieval over ' + ', '.join(engine.retriever.store.domains) if engine.retriever else 'fixed'}"
               f"{', API key required' if api_key else ''})", err=True)
    uvicorn.Server(server_config(engine, host, port, guard, docs)).run()
