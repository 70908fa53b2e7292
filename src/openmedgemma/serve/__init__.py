"""openmedgemma.serve: the OpenAI-compatible HTTP server (`openmedgemma serve`).

app.py wires routes, auth, limits and errors; protocol.py holds the request / response bodies;
chat.py and embeddings.py are the routes; media.py turns data: URIs into images; tools.py maps
OpenAI tools to Gemma's function-calling prompt; metrics.py the Prometheus collectors; cli.py the
command. Continuous batching itself is the engine's (`openmedgemma.engine.scheduler`).
"""
