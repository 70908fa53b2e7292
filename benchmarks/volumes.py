"""Volumes and slide cases at MedGemma 1.5's full size, from files to the first token: ours vs transformers.

    nice python benchmarks/volumes.py                    # 85 slices (~22k tokens) and 126 patches (~33k tokens)
    python benchmarks/volumes.py --slices 8 --patches 8  # a quick check of the script

Model: a Gemma 3 multimodal checkpoint built by transformers (its random init) and saved; ours loads the
same files. Decoder: the `130m` shape of benchmarks/generate.py (12 layers, hidden 768, 106M non-embedding
parameters) with nano's 4096-token vocabulary and tokenizer; vision: a small SigLIP (2 layers, hidden 128)
at the real 896 px input and 256 soft tokens per image, so the decoder sees the real token counts.

Cases, each timed from the files to the first generated token, in a fresh process per (implementation,
case) that also reports its peak memory (VmHWM after the weights are resident, minus the RSS then):
  volume: the shared 128-slice DICOM series. Ours: `volume_content` (folder -> 85 windowed slices) then
      `Engine.generate` (uint8 pixels, vision tower 8 images at a time, prefill in 2048-token chunks).
      transformers: the series read the notebook way (pydicom, sort by position, sample, min-max), then
      `Gemma3Processor.apply_chat_template` and `generate` (all images in one tower call, one prefill).
  slides: two pyramidal TIFF slides written here (144 tissue patches of 896 px at 20x), 126 patches kept
      (stratified). Tiling is ours on both sides (transformers has none); then as above.
Same prompt layout on both sides (instruction, images with labels, question); the token ids are asserted
equal before timing, and the first tokens are compared. Then the `4b` figures are computed (KV bytes,
activation peak per prefill chunk, vision batch), since a 4b model does not fit these runs.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe  # noqa: E402

from openmedgemma.config import MedGemmaConfig, get_config  # noqa: E402
from openmedgemma.engine import KVCache  # noqa: E402

NANO = ROOT / "models" / "medgemma-nano"
INSTRUCTION = "You are reviewing the images below, each followed by its label. Review them carefully."
QUESTION = "Describe the findings."
APERIO = "Aperio Image Library |AppMag = 20|MPP = 0.5"
TEXT = dict(vocab_size=4096, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=6,
            num_key_value_heads=3, head_dim=128, query_pre_attn_scalar=128, sliding_window=1024,
            max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 8.0})  # fmt: skip
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, image_size=896,
              patch_size=14, vision_use_head=False)  # fmt: skip


def write_checkpoint(folder: Path) -> None:
    """A transformers-made checkpoint with nano's tokenizer and a processor at 896 px / 256 tokens."""
    import transformers

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json"):
        shutil.copy(NANO / name, folder / name)
    nano = json.loads((NANO / "config.json").read_text())
    config = transformers.Gemma3Config(
        text_config={**{k: v for k, v in nano["text_config"].items() if k != "layer_types"}, **TEXT,
                     "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2},
        vision_config={**nano["vision_config"], **VISION},
        mm_tokens_per_image=256, boi_token_index=nano["boi_token_index"], eoi_token_index=nano["eoi_token_index"],
        image_token_index=nano["image_token_index"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # small token embeddings, so that the first token is not just a copy of an input token
        model.get_input_embeddings().weight.normal_(0, 0.02)
    model.save_pretrained(folder)
    for name in ("processor_config.json", "preprocessor_config.json"):
        data = json.loads((NANO / name).read_text())
        data["image_seq_length"] = 256
        if "size" in data:
            data["size"] = {"height": 896, "width": 896}
        (folder / name).write_text(json.dumps(data, indent=2))


def write_case(folder: Path) -> list[Path]:
    """Two 20x pyramidal TIFF slides, each with 9 x 8 = 72 tissue cells of 896 px, every cell's colour distinct
    (distinct patches: the feature cache must not help)."""
    import tifffile
    from PIL import Image

    paths = []
    for k in range(2):
        cells = (8, 9)  # rows, columns of tissue
        base = np.full(((cells[0] + 1) * 896, (cells[1] + 1) * 896, 3), (235, 235, 238), dtype=np.uint8)
        ramp = (np.arange(896) // 56).astype(np.uint8)  # a mild gradient inside each cell
        for r in range(cells[0]):
            for c in range(cells[1]):
                i = (k * 72 + r * cells[1] + c) * 3
                cell = base[r * 896:(r + 1) * 896, c * 896:(c + 1) * 896]
                cell[:] = (170 + i % 40, 60 + (i // 40) % 40, 140)
                cell[..., 2] += ramp[None, :]
        path = folder / f"slide{k + 1}.tif"
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for index, factor in enumerate((1, 4, 16)):
                level = np.asarray(Image.fromarray(base).reduce(factor)) if factor > 1 else base
                tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1 if index else 0,
                          resolution=(1e4 / (0.5 * factor),) * 2, resolutionunit="CENTIMETER",
                          description=APERIO if index == 0 else None)  # fmt: skip
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- the two pipelines


def ours(case: str, source, args, folder: Path):
    """Files -> first token with our engine; returns (first token id, prompt ids, stage seconds)."""
    from openmedgemma.engine import Engine, GenerationConfig
    from openmedgemma.imaging.inputs import slides_content, volume_content

    engine = STATE["engine"]
    t0 = time.perf_counter()
    if case == "volume":
        items = volume_content(source, max_slices=args.slices)
    else:
        items = slides_content(source, magnification=20, max_patches=args.patches)
    messages = [{"role": "user", "content": [{"type": "text", "text": INSTRUCTION}, *items,
                                             {"type": "text", "text": QUESTION}]}]  # fmt: skip
    t1 = time.perf_counter()
    [result] = engine.generate([messages], GenerationConfig(max_new_tokens=1))
    t2 = time.perf_counter()
    stages = dict(files_to_images=t1 - t0, prepare=t2 - t1 - result.vision_seconds - result.prefill_seconds,
                  vision=result.vision_seconds, prefill=result.prefill_seconds)  # fmt: skip
    return result.token_ids[0], stages, lambda: engine.prepare(messages).ids


def transformers_run(case: str, source, args, folder: Path):
    from PIL import Image

    processor, model = STATE["processor"], STATE["model"]
    t0 = time.perf_counter()
    if case == "volume":
        images = notebook_series(source, args.slices)
        labels = [f"SLICE {n}" for n in range(1, len(images) + 1)]
    else:
        from openmedgemma.imaging.inputs import slides_input

        made = slides_input(source, magnification=20, max_patches=args.patches)  # no tiler in transformers
        images, labels = made.images, made.captions
    content = [{"type": "text", "text": INSTRUCTION}]
    if case == "volume":
        for image, label in zip(images, labels):
            content += [{"type": "image", "image": Image.fromarray(image)}, {"type": "text", "text": label}]
    else:
        for slide in (1, 2):
            content.append({"type": "text", "text": f"SLIDE {slide}"})
            content += [{"type": "image", "image": Image.fromarray(im)}
                        for im, label in zip(images, labels) if label.startswith(f"SLIDE {slide} ")]  # fmt: skip
    content.append({"type": "text", "text": QUESTION})
    t1 = time.perf_counter()
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    t2 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=1, pad_token_id=0)
    stages = dict(files_to_images=t1 - t0, prepare=t2 - t1, generate=time.perf_counter() - t2)
    return int(out[0, -1]), stages, lambda: inputs["input_ids"][0].tolist()


def notebook_series(folder: Path, max_slices: int) -> list[np.ndarray]:
    """The official notebook's way: pydicom, sort along z, sample, MR min-max over the volume, gray -> RGB."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in sorted(Path(folder).glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    n = len(datasets)
    keep = [int(round(i / max_slices * (n - 1))) for i in range(1, max_slices + 1)] if n > max_slices else range(n)
    volume = np.stack([ds.pixel_array.astype(np.float64) for ds in datasets])
    low, high = volume.min(), volume.max()
    gray = [np.round((volume[i] - low) / (high - low) * 255).astype(np.uint8) for i in keep]
    return [np.repeat(g[..., None], 3, -1) for g in gray]


STATE: dict = {}


def child(impl: str, case: str, folder: Path, source: str, args) -> None:
    """One (implementation, case) in this fresh process: load, make the weights resident, reset the peak,
    run once; print JSON (seconds, peak rise, first token, prompt ids hash)."""
    torch.set_num_threads(args.threads)
    source = source if case == "volume" else source.split(os.pathsep)
    if impl == "ours":
        from openmedgemma import MedGemma
        from openmedgemma.engine import Engine
        from openmedgemma.tokenizer import Tokenizer

        model = MedGemma.from_pretrained(folder)
        STATE["engine"] = Engine(model, Tokenizer.from_pretrained(folder), vision_batch=args.vision_batch)
        run = ours
    else:
        import transformers

        model = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        STATE.update(model=model, processor=transformers.AutoProcessor.from_pretrained(folder))
        run = transformers_run
    with torch.no_grad():
        for t in model.parameters():
            t.float().sum()  # resident before the baseline
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    base = status("VmRSS")
    t = time.perf_counter()
    token, stages, prompt_ids = run(case, source, args, folder)
    seconds = time.perf_counter() - t
    peak = status("VmHWM") - base
    ids = prompt_ids()
    print(json.dumps(dict(seconds=seconds, peak_rise=peak, base=base, token=token, prompt_tokens=len(ids),
                          ids_hash=hash(tuple(ids)), stages=stages)))  # fmt: skip


def status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def run_child(impl: str, case: str, folder: Path, source: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, case, str(folder), source, "--slices", str(args.slices),
           "--patches", str(args.patches), "--threads", str(args.threads), "--vision-batch", str(args.vision_batch)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONHASHSEED": "0"}  # see benchmarks/generate.py
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{impl} {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- 4b by calculation


def four_b(tokens: dict[str, tuple[int, int]], chunk: int = 2048, vision_batch: int = 8) -> dict:
    """Bytes for the 4b shape in bf16 at these prompt lengths: KV cache, one prefill chunk's largest
    activations, the image features, and one vision-tower batch."""
    cfg: MedGemmaConfig = get_config("4b")
    text, vision = cfg.text, cfg.vision
    b = 2  # bf16
    out = {}
    for case, (length, images) in tokens.items():
        kv = KVCache.nbytes_for(text, 1, length + 1, torch.bfloat16)
        masks = chunk * length + chunk * (text.sliding_window + chunk)  # bool: global + sliding layer masks
        mlp = chunk * text.intermediate_size * 2 * b  # gate and up
        qkv = chunk * (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim * b
        sliding_kv = 2 * (text.sliding_window + chunk) * text.num_key_value_heads * text.head_dim * b  # ring + chunk
        activations = masks + mlp + qkv + sliding_kv + 3 * chunk * text.hidden_size * 4  # residual, normed (fp32)
        features = images * cfg.mm_tokens_per_image * text.hidden_size * b
        out[case] = dict(prompt_tokens=length, images=images, kv_bytes=kv, chunk_activation_bytes=activations, feature_bytes=features,
                         unchunked_mask_bytes=length * length)  # fmt: skip
    patches = (vision.image_size // vision.patch_size) ** 2
    per_image = patches * (4 * vision.hidden_size + 2 * vision.intermediate_size) * b  # qkv + out, MLP and its gelu
    out["vision_batch"] = dict(images=vision_batch, bytes=vision_batch * per_image,
                               pixels_uint8=3 * vision.image_size**2,
                               pixels_fp32=12 * vision.image_size**2)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=85)
    parser.add_argument("--patches", type=int, default=126)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vision-batch", type=int, default=8)
    parser.add_argument("--cases", default="volume,slides")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "CASE", "FOLDER", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], Path(args.child[2]), args.child[3], args)
    torch.set_num_threads(args.threads)
    print(f"machine: {describe()}; {datetime.date.today()}")
    data = Path(os.environ.get("OPENMEDGEMMA_DATA", ROOT.parent / "shared" / "data"))
    series = data / "dicom" / "pacsman_synthetic" / "dicomseries"
    report = dict(machine=describe(), torch=torch.__version__, date=str(datetime.date.today()), cases={})
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        write_checkpoint(folder)
        for case in args.cases.split(","):
            source = str(series) if case == "volume" else os.pathsep.join(map(str, write_case(Path(tmp))))
            mine = run_child("ours", case, folder, source, args)
            theirs = run_child("transformers", case, folder, source, args)
            assert mine["ids_hash"] == theirs["ids_hash"], "the two prompts differ"
            tokens[case] = (mine["prompt_tokens"], args.slices if case == "volume" else args.patches)
            entry = dict(ours=mine, transformers=theirs, time_ratio=mine["seconds"] / theirs["seconds"],
                         memory_ratio=mine["peak_rise"] / theirs["peak_rise"],
                         same_first_token=mine["token"] == theirs["token"])  # fmt: skip
            report["cases"][case] = entry
            n = args.slices if case == "volume" else args.patches
            print(f"\n{case}: {n} images, {mine['prompt_tokens']:,} prompt tokens (same ids on both sides); "
                  f"first token equal: {entry['same_first_token']}")  # fmt: skip
            for name, r in (("ours", mine), ("transformers", theirs)):
                stages = ", ".join(f"{k} {v:.1f}s" for k, v in r["stages"].items())
                print(f"  {name:12s} {r['seconds']:7.1f} s to first token, "
                      f"peak +{r['peak_rise'] / 2**30:.2f} GiB ({stages})")
            print(f"  ours / transformers: time {entry['time_ratio']:.2f}, peak memory {entry['memory_ratio']:.2f}")
    report["4b"] = calc = four_b(tokens)
    print("\n4b shape, bf16, by calculation (KVCache.nbytes_for; 2048-token prefill chunks):")
    for case in tokens:
        c = calc[case]
        print(f"  {case}: {c['prompt_tokens']:,} tokens: KV cache {c['kv_bytes'] / 2**30:.2f} GiB; activations of one "
              f"chunk ~{c['chunk_activation_bytes'] / 2**20:.0f} MiB; image features "
              f"{c['feature_bytes'] / 2**20:.0f} MiB (an unchunked prefill's bool mask alone: "
              f"{c['unchunked_mask_bytes'] / 2**30:.2f} GiB per layer type)")  # fmt: skip
    v = calc["vision_batch"]
    print(f"  vision tower batch of {v['images']}: ~{v['bytes'] / 2**20:.0f} MiB of activations per layer; pixels held "
          f"as uint8 {v['pixels_uint8'] / 2**20:.1f} MiB per image "
          f"(fp32 {v['pixels_fp32'] / 2**20:.1f} MiB)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
