"""WMLA Elastic Distributed Inference: the service behind kernel.py, a local stand-in for the EDI runtime
(`redhareapi`) with a real HTTP endpoint, storage volumes, async requests and submission packaging."""
from __future__ import annotations
