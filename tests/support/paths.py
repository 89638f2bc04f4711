"""Where the repository's files are, for tests that read docs, clients, service files and scripts."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENTS = REPO / "clients"
DOCS = REPO / "docs"
SERVICE = REPO / "service"
BENCHMARKS = REPO / "benchmarks"
