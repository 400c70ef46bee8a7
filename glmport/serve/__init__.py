"""``glmport serve``: an OpenAI-compatible chat server and a web chat page for a model or a training result.

The parts, each in its own module:

* :mod:`~glmport.serve.protocol` - requests checked field by field; responses, stream chunks and errors in
  OpenAI's shapes;
* :mod:`~glmport.serve.prompt` - an OpenAI conversation (tools, tool calls, tool results) as the family's
  prompt, and the model's reply (a tool call or text) as an OpenAI message;
* :mod:`~glmport.serve.models` - the base model and its adapters, one selected per request by ``model``;
* :mod:`~glmport.serve.worker` - the one generation thread and its bounded queue (why one at a time: there);
* :mod:`~glmport.serve.decoding` - ``stop`` sequences over streamed text;
* :mod:`~glmport.serve.limits` - every bound a request meets, and the API key;
* :mod:`~glmport.serve.app` - the FastAPI routes; ``static/`` the chat page (no external assets);
* :mod:`~glmport.serve.server` - the socket, loading, uvicorn, shutting down.

FastAPI and uvicorn are an optional extra (``pip install "glmport[serve]"``): only ``app`` and ``server``
import them, and only when a server starts.
"""
