"""`premoe serve`: an OpenAI-compatible server, retrieving and swapping experts per request."""
from __future__ import annotations

import click


@click.command("serve")
@click.argument("model")
@click.option("--store", "store_path", type=click.Path(), help="Pattern store: retrieve a domain per request.")
@click.option("--experts", type=int, help="M, resident experts per layer (with --store).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--name", help="Model id clients send (default: the model directory's name).")
@click.option("--max-prompt-tokens", default=2048, show_default=True, help="Longer prompts are refused (400).")
@click.option("--max-tokens", default=256, show_default=True, help="Cap on generated tokens per request.")
@click.option("--max-queue", default=8, show_default=True, help="Requests running or waiting; more get 429.")
@click.option("--retrieval-tokens", default=256, show_default=True, help="Request tokens retrieval looks at.")
def command(model, store_path, experts, host, port, name, max_prompt_tokens, max_tokens, max_queue,
            retrieval_tokens) -> None:
    """Serve MODEL over HTTP (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).

    \b
    premoe serve testbed --store store/ --experts 16      # retrieve + swap experts per request
    premoe serve python-50/                               # a compiled specialist, as it is
    """
    import uvicorn

    from premoe.errors import InputError
    from premoe.serve import Engine, ServeLimits, create_app

    limits = ServeLimits(max_prompt_tokens, max_tokens, max_queue, retrieval_tokens)
    if store_path:
        if experts is None:
            raise InputError("--store needs --experts M (resident experts per layer)")
        engine = Engine.retrieval(model, store_path, experts, limits, name)
    elif experts is not None:
        raise InputError("--experts needs --store; to serve a fixed subset, compile it and serve the compiled dir")
    else:
        engine = Engine.fixed_model(model, limits, name)
    click.echo(f"serving {engine.name} on http://{host}:{port}/v1 "
               f"({'retrieval over ' + ', '.join(engine.retriever.store.domains) if engine.retriever else 'fixed'})",
               err=True)
    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
