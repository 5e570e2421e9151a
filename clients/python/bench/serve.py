"""Serve the README's example app (examples/app.py) for the benchmark, with or
without the Tollgate middleware: `python serve.py PORT with|without`."""

import importlib.util
import sys
from pathlib import Path

import uvicorn

port, mode = int(sys.argv[1]), sys.argv[2]
path = Path(__file__).resolve().parent.parent / "examples" / "app.py"
spec = importlib.util.spec_from_file_location("example_app", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
app = module.app
if mode == "without":
    from tollgate.asgi import TollgateMiddleware

    app.user_middleware = [m for m in app.user_middleware if m.cls is not TollgateMiddleware]
    # Without the middleware there is no decision: admit every call as is.
    module.decision_of = lambda request: _Admitted()


class _Admitted:
    degraded = False
    warn = False


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
