"""OpenAI-compatible HTTP server around an asynchronous image-generation backend."""

from glideserve.server.app import create_app
from glideserve.server.state import ServerConfig

__all__ = ["create_app", "ServerConfig"]
