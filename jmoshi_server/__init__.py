"""jmoshi-server: a self-hosted, real-time Japanese voice-chat server for J-Moshi."""

__version__ = "0.1.0"
