"""Serving: an OpenAI-compatible HTTP API and a web playground over one model or several.

    from lmforge.serve import serve
    serve("runs/quickstart/model")            # http://127.0.0.1:8000/ (playground), /v1/...

engine.py      the worker thread that runs generation (the only part that touches the model)
detokenize.py  generated ids -> final text pieces (split characters, stop strings)
schemas.py     request bodies, strictly validated
protocol.py    OpenAI's response, stream-chunk and error shapes
http.py        reading bodies under size and time limits; errors in OpenAI's shape
app.py         the FastAPI app: routes, limits, auth; `create_app`
launch.py      `serve`: options checked, socket bound, models loaded, uvicorn run
static/        the playground page (plain HTML/CSS/JS, no external resources)
"""

from lmforge.serve.app import Limits, create_app
from lmforge.serve.engine import Engine, GenerationRequest, GenerationResult, Piece, TokenInfo
from lmforge.serve.launch import serve

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "Limits", "Piece", "TokenInfo", "create_app", "serve"]
