"""openai-forward on Twisted: a streaming forwarding daemon for the OpenAI API."""

__version__ = "0.1.0"
