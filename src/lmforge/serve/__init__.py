"""Serving: an OpenAI-compatible HTTP API and a web playground over one model.

    from lmforge.serve import serve
    serve("runs/quickstart/model")            # http://127.0.0.1:8000/ (playground), /v1/...

engine.py      the worker thread that runs generation (the only part that touches the model)
detokenize.py  generated ids -> final text pieces (split characters, stop strings)
schemas.py     request bodies, strictly validated
protocol.py    OpenAI's response, stream-chunk and error shapes
app.py         the FastAPI app: routes, limits, auth; `create_app`, `serve`
static/        the playground page (plain HTML/CSS/JS, no external resources)
"""

from lmforge.serve.app import Limits, create_app, serve
from lmforge.serve.engine import Engine, GenerationRequest, GenerationResult, Piece, TokenInfo

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "Limits", "Piece", "TokenInfo", "create_app", "serve"]
