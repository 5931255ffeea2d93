"""`premoe route`: one OpenAI endpoint in front of a fleet of specialist servers, picking one per request.

At scale a deployment runs one compiled specialist per domain (plus the
generalist) on any OpenAI-compatible server (vLLM, SGLang, llama.cpp's
server, ``premoe serve``). The router runs each request through the base
model's first MoE layer only (:class:`~premoe.retrieval.Retriever`, about
1/L of a forward pass), picks the nearest stored domain (or the generalist)
and forwards the request to that domain's backend:

* **the same front door as premoe serve**: body cap, read deadlines, API key,
  Host check (:mod:`premoe.guard`) and strict OpenAI validation
  (:mod:`premoe.openai_request`): a request a backend would refuse is refused
  here, with the same 400;
* **never drops a request**: a backend that is down, overloaded, failing,
  misconfigured, hung or answering something that is not a completion sends
  its request on to the generalist, then to any other live backend; a stream
  whose backend dies is continued on the next one as the same response
  (the rules: :mod:`premoe.route.relay`);
* **streaming passed through unbuffered**: every server-sent event is
  forwarded as soon as its line arrives;
* **visible decisions**: ``x-premoe-route-domain`` / ``-backend`` headers, a
  ``premoe_route`` field on non-streaming responses, and ``/metrics``
  (decisions per domain and backend, fallbacks by reason, retrieval and
  forwarding seconds, backend health).

One module per job:

* :mod:`premoe.route.config`: the config file (backends, timeouts), read and checked;
* :mod:`premoe.route.router`: the router's state: retrieval, backend health, counters;
* :mod:`premoe.route.relay`: moving one request through the fleet until a backend answers it;
* :mod:`premoe.route.app`: the HTTP app and its uvicorn config.

Example::

    from premoe.route.app import route_server_config
    from premoe.route.config import load_config
    from premoe.route.router import Router

    router = Router.load(load_config("route.json"))
    uvicorn.Server(route_server_config(router, "127.0.0.1", 9000)).run()
"""
