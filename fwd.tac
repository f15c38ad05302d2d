# The openai-forward daemon configured from the environment (and .env): twistd -ny fwd.tac
from twisted.application import service

from fwd import config as configuration
from fwd.daemon import build_service

try:
    application = service.Application("openai-forward")
    build_service(configuration.load({}), load=lambda: configuration.load({})).setServiceParent(application)
except configuration.ConfigError as problem:
    raise SystemExit(f"openai-forward: {problem}")
