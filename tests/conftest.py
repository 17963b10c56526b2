import os
import tempfile

# Each test process (each xdist worker) gets its own persistent compilation cache, shared only with
# the subprocesses it starts: two processes compiling and writing the same entries at once, or a
# process reading entries written under other XLA flags, is not what this suite tests.
os.environ.setdefault("PPINFER_CACHE_DIR", tempfile.mkdtemp(prefix="ppinfer-test-jax-cache-"))

import jax  # noqa: E402
import pytest  # noqa: E402


def _import_arviz_once_per_machine_at_a_time() -> None:
    """Import ArviZ holding a file lock. On its first import of a day, ArviZ 0.23 writes a stamp
    file through a fixed temporary name, so two xdist workers importing it at once collide
    (``FileNotFoundError`` at collection in one of them). The first import under the lock writes
    the stamp; the other worker then finds it and writes nothing."""
    import fcntl

    from platformdirs import user_cache_dir

    folder = user_cache_dir("arviz", "arviz")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ppinfer-tests.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        import arviz  # noqa: F401


_import_arviz_once_per_machine_at_a_time()


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module, drop the compiled programs it left in memory (ppinfer's compile
    cache and JAX's): a worker runs dozens of modules, and without this its memory grows by every
    program compiled so far — enough, with two workers, to make XLA's compiler fail an allocation."""
    yield
    import gc

    from ppinfer import _compile

    with _compile.TRACE_LOCK:
        _compile._CACHE.clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    """Run the test with 64-bit floats (exact checks compare measures to ~1e-12)."""
    with jax.enable_x64(True):
        yield


def run_on_forced_devices(script: str, num_devices: int = 4, timeout: int = 600) -> str:
    """Run ``script`` in a fresh Python with ``num_devices`` forced CPU devices (the flag must be set
    before JAX starts); fail with its stderr if it fails; return its stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        PYTHONPATH=str(root),
        PPINFER_COMPILATION_CACHE="0",  # other devices: nothing to share with the test process
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def train_byte_level_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2 style, ``<|endoftext|>`` special) trained
    on ``texts``: built locally, no download."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok
