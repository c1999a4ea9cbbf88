"""riskd: risk-control and fraud-detection daemon for short-video and live-room shops."""

__version__ = "0.1.0"
