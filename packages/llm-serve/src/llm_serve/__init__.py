"""llm-serve: engine, KV caches, continuous batching, sampling, OpenAI-compatible server.

The HTTP app lives in `llm_serve.server.create_app` (imported on demand: it pulls in FastAPI).
"""

from llm_serve.checkpoint import load_any, load_native, save_native
from llm_serve.engine import DecodeState, Engine, Prefix
from llm_serve.sampling import SamplingError, SamplingParams
from llm_serve.scheduler import Event, QueueFull, Request, Scheduler, generate_text
from llm_serve.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "DecodeState",
    "Engine",
    "Event",
    "Prefix",
    "QueueFull",
    "Request",
    "SamplingError",
    "SamplingParams",
    "Scheduler",
    "Tokenizer",
    "__version__",
    "generate_text",
    "load_any",
    "load_native",
    "save_native",
]
