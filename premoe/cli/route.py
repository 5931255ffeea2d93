"""`premoe route`: one OpenAI endpoint in front of specialist servers, forwarding each request to its domain's."""
from __future__ import annotations

import click

from premoe.cli.options import FiniteFloat


@click.command("route")
@click.argument("config", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; beyond loopback, set --api-key.")
@click.option("--port", default=9000, type=click.IntRange(1, 65535), show_default=True)
@click.option("--max-body", default=1 << 20, type=click.IntRange(min=1024), show_default=True,
              help="Request body bytes; larger bodies are refused (413) before they are read.")
@click.option("--read-timeout", default=30.0, type=FiniteFloat(min=0.1, max=3600), show_default=True,
              help="Seconds a client may take to send its headers, and again its body.")
@click.option("--api-key", envvar="PREMOE_API_KEY", help="Require 'Authorization: Bearer KEY' (env PREMOE_API_KEY).")
@click.option("--docs", is_flag=True, help="Serve /openapi.json, /docs and /redoc (off by default).")
def command(config, host, port, max_body, read_timeout, api_key, docs) -> None:
    """Route OpenAI requests to the backend of each request's domain (CONFIG: a JSON file).

    \b
    CONFIG names the fleet's base model, its pattern store and one backend per domain:
      {"model": "testbed", "store": "store/",
       "backends": {"python": {"url": "http://127.0.0.1:8001"},
                    "generalist": {"url": "http://127.0.0.1:8000"}}}
    Optional: "name" (the model id clients send), "retrieval_tokens", and in seconds
    "health_interval" (2), "connect_timeout" (2) and "backend_timeout" (600: a backend silent
    this long, for a non-streaming request its whole generation, counts as hung).
    A backend's "url" is the server's root (no /v1); it may take "model" and "api_key".
    premoe route route.json --port 9000
    """
    import uvicorn

    from premoe.errors import InputError
    from premoe.guard import GuardConfig, check_bindable, exposure_warning, loopback_hosts
    from premoe.route.app import route_server_config
    from premoe.route.config import check_no_loop, load_config
    from premoe.route.router import Router
    from premoe.serve import base_url

    if api_key is not None and not api_key.strip():
        raise InputError("--api-key (or PREMOE_API_KEY) is empty; give a key or leave it unset")
    check_bindable(host, port)  # before the store and model load
    route_config = load_config(config)
    check_no_loop(route_config, host, port)
    router = Router.load(route_config)
    guard = GuardConfig(max_body=max_body, read_timeout=read_timeout, api_key=api_key,
                        allowed_hosts=loopback_hosts(host, port))
    warning = exposure_warning(host, api_key)
    if warning:
        click.secho(warning, err=True, fg="red", bold=True)
    routes = ", ".join(f"{name} -> {b.url}" for name, b in router.config.backends.items())
    unserved = [d for d in router.retriever.store.domains if d not in router.config.backends]
    click.echo(f"routing {router.config.name} on {base_url(host, port)}/v1: {routes}"
               + (f" ({', '.join(unserved)} -> generalist)" if unserved else ""), err=True)
    uvicorn.Server(route_server_config(router, host, port, guard, docs)).run()
