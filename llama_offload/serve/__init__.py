"""``llama-offload serve``: an OpenAI-compatible HTTP server whose concurrent requests share each decode pass.

    engine.py    one thread owns the model; requests join the running batch at step boundaries
    protocol.py  OpenAI's request fields and response / stream chunk shapes
    app.py       the FastAPI routes, errors, body limit and API key, over the engine
    tools.py     tool calling in Llama 3.1/3.2's JSON format (prompt and parse)
    server.py    building it from a loaded Llama and running it under uvicorn
"""
