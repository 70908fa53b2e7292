"""llama.cpp as the peer of `benchmarks/generate.py --peer llama.cpp`: build, convert, run. Benchmark only.

llama-cpp-python is never a dependency of the package or its tests. The first run downloads its sdist
from PyPI and builds it from source for this CPU into a cache folder (`pip install --target`), which later
runs put on sys.path:

    ~/.cache/openmedgemma/peers/llama-cpp-python-0.3.36/
        src/    the extracted sdist: vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py come from here
        site/   the built package (llama_cpp + its pure-Python runtime dependency diskcache)
        build.json   flags and seconds of the build

`python benchmarks/llama_cpp_peer.py` only builds (or reports the cached build).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

VERSION = "0.3.36"
CACHE = Path(os.environ.get("OPENMEDGEMMA_PEER_CACHE", Path.home() / ".cache/openmedgemma/peers")) / (
    f"llama-cpp-python-{VERSION}"
)
SDIST = CACHE / "src" / f"llama_cpp_python-{VERSION}"
SITE = CACHE / "site"
# AMX CPUs: the default (native) build segfaults on q8_0 with more than one token per batch (llama.cpp
# issue 20824); without the AMX instructions it runs, at the same speed.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cpu_id() -> str:
    """The CPU a native build was made for: model name and every instruction-set flag (-march=native may use
    any of them)."""
    import machine

    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        line = ""
    return f"{machine.cpu_model()}; {' '.join(sorted(set(line.split(':', 1)[-1].split())))}"


def cpu_has_amx() -> bool:
    try:
        return " amx" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def converter() -> Path:
    """llama.cpp's own HF -> GGUF converter, from the same sdist as the built library."""
    fetch_sdist()
    return SDIST / "vendor/llama.cpp/convert_hf_to_gguf.py"


def fetch_sdist() -> None:
    if SDIST.is_dir():
        return
    download = CACHE / "download"
    print(f"llama.cpp peer: downloading the llama-cpp-python {VERSION} sdist from PyPI", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(download),
                    f"llama-cpp-python=={VERSION}"], check=True)  # fmt: skip
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(SDIST.parent, filter="data")


def build() -> dict:
    """Build llama-cpp-python from its sdist for this CPU into SITE (once). Returns the build record."""
    fetch_sdist()
    flags = NO_AMX if cpu_has_amx() else ""
    cmake_args = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
    # CFLAGS / CXXFLAGS seed CMAKE_C(XX)_FLAGS; explicit -mno-* win over -march=native's implied ISA.
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "CFLAGS": flags, "CXXFLAGS": flags,
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}  # fmt: skip
    tmp = CACHE / "site.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"llama.cpp peer: building llama-cpp-python {VERSION} from source (CMAKE_ARGS={cmake_args!r}, "
          f"C/C++ flags {flags!r}); this takes several minutes, once", flush=True)  # fmt: skip
    t = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp)]
    subprocess.run([*pip, "--no-binary", "llama-cpp-python", str(SDIST)], check=True, env=env)
    subprocess.run([*pip, "diskcache"], check=True)  # llama_cpp's only runtime import not in our venv
    record = dict(version=VERSION, cmake_args=cmake_args, c_flags=flags, seconds=round(time.perf_counter() - t, 1),
                  cpu=cpu_id())  # fmt: skip
    (tmp / "build.json").write_text(json.dumps(record))
    shutil.rmtree(SITE, ignore_errors=True)
    tmp.rename(SITE)
    print(f"llama.cpp peer: built in {record['seconds']:.0f} s into {SITE}", flush=True)
    return record


def load():
    """Import llama_cpp: the cached build, else an installed one, else build it now. Returns (module, build info).
    A cached build made on another CPU (a shared home folder) is rebuilt: -march=native code may not run here."""
    record = SITE / "build.json"
    if record.exists() and json.loads(record.read_text()).get("cpu", cpu_id()) != cpu_id():
        print(f"llama.cpp peer: the cached build in {SITE} was made for another CPU; rebuilding", flush=True)
        build()
    elif not (SITE / "llama_cpp").is_dir():
        try:
            import llama_cpp

            return llama_cpp, f"installed llama-cpp-python {llama_cpp.__version__} ({llama_cpp.__file__})"
        except ImportError:
            build()
    sys.path.insert(0, str(SITE))
    import llama_cpp

    record = json.loads((SITE / "build.json").read_text())
    info = (f"llama-cpp-python {llama_cpp.__version__} built from source here ({record['seconds']:.0f} s; "
            f"{record['cmake_args']}{'; ' + record['c_flags'] if record['c_flags'] else ''})")  # fmt: skip
    return llama_cpp, info


if __name__ == "__main__":
    print(load()[1])


# ------------------------------------------------------------------ conversion


@contextlib.contextmanager
def native_output_to(log: Path | str):
    """Send what C code writes to stdout / stderr (llama.cpp's per-tensor quantize lines, its context notices)
    to `log`: Python's sys.stderr redirection does not reach it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A sentencepiece tokenizer.model for a random-weight checkpoint: Gemma's special ids (pad 0, eos 1, bos 2,
    unk 3) and the 256 byte pieces. convert_hf_to_gguf needs one for Gemma 3 and fills the ids it lacks, up to
    config.json's vocab_size, with unused [PADn] pieces, so the GGUF has the model's vocabulary size exactly.
    The benchmark feeds token ids, never text, so what the pieces spell does not matter."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    piece_type = pb.ModelProto.SentencePiece.Type
    for text, kind in [("<pad>", piece_type.CONTROL), ("<eos>", piece_type.CONTROL), ("<bos>", piece_type.CONTROL),
                       ("<unk>", piece_type.UNKNOWN)] + [(f"<0x{b:02X}>", piece_type.BYTE) for b in range(256)]:  # fmt: skip
        model.pieces.add(piece=text, score=0.0, type=kind)
    if len(model.pieces) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(model.pieces)} base pieces")
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(model.pieces), True
    spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id = 0, 1, 2, 3
    model.normalizer_spec.name, model.normalizer_spec.add_dummy_prefix = "identity", False
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())


def convert(hf_folder: Path, out: Path, outtype: str, log: Path) -> Path:
    """HF checkpoint -> GGUF (f32 / f16 / bf16) with llama.cpp's own converter, in a child process."""
    if not (hf_folder / "tokenizer.model").exists():
        write_tokenizer(hf_folder, json.loads((hf_folder / "config.json").read_text())["vocab_size"])
    target = out / f"model-{outtype}.gguf"
    partial = target.with_suffix(".partial")  # renamed when whole: an interrupted run leaves no GGUF to reuse
    with open(log, "a") as f:
        subprocess.run([sys.executable, str(converter()), str(hf_folder), "--outtype", outtype, "--outfile",
                        str(partial)], check=True, stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    partial.replace(target)
    return target


def quantize(llama_cpp, source: Path, kind: str, threads: int, log: Path | str = os.devnull) -> Path:
    """GGUF -> q8_0 / q4_0 with llama_model_quantize (llama.cpp's defaults for that type: 1-d tensors stay
    f32, and for q4_0 the tied output / embedding matrix gets a higher-precision type: see bits per weight)."""
    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    target = source.with_name(f"model-{kind}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftypes[kind], threads
    partial = target.with_suffix(".partial")
    with native_output_to(log):
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if failed:
        raise RuntimeError(f"llama_model_quantize {source} -> {kind} failed (log: {log})")
    partial.replace(target)
    return target


# ------------------------------------------------------------------ running


class Peer:
    """One GGUF model loaded by llama.cpp, driven token by token: eval the prompt in one batch, then greedy argmax
    of the last logits, eval that token, and so on (what a llama.cpp generate loop does, without sampler
    overhead). n_threads and n_threads_batch are set together: n_threads alone leaves the prompt's batch on
    every core."""

    def __init__(self, llama_cpp, path: Path, threads: int, n_ctx: int = 512):
        self.lib = llama_cpp
        with native_output_to(os.devnull):  # verbose=False still leaves a KV-cache notice per context
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
                                       seed=0)  # fmt: skip
        self.n_vocab = self.llm.n_vocab()
        model = self.llm.model
        self.bits_per_weight = 8 * llama_cpp.llama_model_size(model) / llama_cpp.llama_model_n_params(model)

    def last_logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def stream(self, prompt: list[int], n: int):
        """Yield n greedy tokens, each as soon as it is known."""
        self.llm.reset()
        self.llm.eval(prompt)
        for i in range(n):
            token = int(self.last_logits().argmax())
            yield token
            if i + 1 < n:
                self.llm.eval([token])

    def generate(self, prompt: list[int], n: int) -> list[int]:
        return list(self.stream(prompt, n))

    def prompt_logits(self, prompt: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(prompt)
        return self.last_logits().copy()

    def close(self) -> None:
        self.llm.close()
