"""EHR navigator: index time and size for the shared Synthea bundles, query latency against a scan of the JSON,
and prompt tokens per EHRQA question in both modes.

- index: `build_index` of the 25 bundles into a new SQLite file (median of --repeats), its size, reopening;
- queries (medians over every patient): the patient's Observations with one LOINC code, a whole type, the
  record manifest; the reference is the same query answered by reading and filtering the bundle JSON files
  (what a store-less tool would do per call), so the ratio is measured in the same run;
- tokens per question: `context=record` (the condensed record + question, one prompt) against
  `context=agent` (every prompt the navigator sends, a protocol-following scripted model choosing the types
  and codes, as in tests/ehr). Counted with the bundled nano tokenizer (4096-entry vocabulary, so more tokens
  than Gemma's 262k vocabulary would give) and as characters / 4 (about Gemma's rate on English text).

    python benchmarks/ehr.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from openmedgemma.ehr.agent import Navigator  # noqa: E402
from openmedgemma.ehr.fhir import code_matches  # noqa: E402
from openmedgemma.ehr.sqlite import SQLiteStore, build_index  # noqa: E402
from openmedgemma.ehr.tools import Tools  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from tests.conftest import find_shared_data  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def scan(files: list[Path], patient_id: str, rtype: str, codes=None) -> list[dict]:
    """The reference: read every bundle, keep the patient's resources of the type (and codes)."""
    out = []
    for path in files:
        bundle = json.loads(path.read_text())
        urls = {e["fullUrl"]: e["resource"]["id"] for e in bundle["entry"]}
        for entry in bundle["entry"]:
            res = entry["resource"]
            subject = (res.get("subject") or res.get("patient") or {}).get("reference", "")
            if res["resourceType"] == rtype and urls.get(subject) == patient_id and (not codes or code_matches(res, codes)):
                out.append(res)
    return out


class CountingModel:
    """Wraps the scripted navigator model and measures every prompt."""

    def __init__(self, inner, count):
        self.inner, self.count, self.name, self.prompt_chars, self.prompt_tokens = inner, count, "counting", 0, 0

    def generate(self, batch, *, max_new_tokens, seed):
        for messages in batch:
            text = messages[0]["content"]
            self.prompt_chars += len(text)
            self.prompt_tokens += self.count(text)
        return self.inner.generate(batch, max_new_tokens=max_new_tokens, seed=seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--questions", type=int, default=45, help="questions for the token counts (default 45)")
    args = parser.parse_args()
    data = find_shared_data()
    if data is None:
        print("shared data not found: set $OPENMEDGEMMA_DATA", file=sys.stderr)
        return 2
    bundles = data / "synthea_fhir_r4"
    files = sorted(bundles.glob("*.json"))
    print(f"machine: {describe()}; Python {platform.python_version()}; {len(files)} bundles, "
          f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB of JSON")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for i in range(args.repeats):
            db = Path(tmp) / f"r{i}.sqlite"
            start = time.perf_counter()
            build_index([bundles], db).close()
            times.append(time.perf_counter() - start)
        size = db.stat().st_size
        reopen = median_ms(lambda: SQLiteStore(db).close(), args.repeats)
        print(f"index: {statistics.median(times):.2f} s (median of {args.repeats}), {size / 1e6:.1f} MB, reopen {reopen:.2f} ms")

        store = SQLiteStore(db)
        tools = Tools(store)
        patients = [p["id"] for p in store.patients()]
        rows = []
        for label, ours, ref in [
            ("Observations of one LOINC code", lambda p: store.search(p, "Observation", codes=["http://loinc.org|8302-2"]),
             lambda p: scan(files, p, "Observation", ["http://loinc.org|8302-2"])),
            ("all MedicationRequests", lambda p: store.search(p, "MedicationRequest"),
             lambda p: scan(files, p, "MedicationRequest")),
            ("record manifest (every type)", lambda p: tools.manifest(p), None),
        ]:  # fmt: skip
            ours_ms = statistics.median(median_ms(lambda: ours(p), args.repeats) for p in patients[:10])
            ref_ms = statistics.median(median_ms(lambda: ref(p), 1) for p in patients[:3]) if ref else None
            rows.append((label, ours_ms, ref_ms))
        print("\n| query (per patient) | index (ms) | scan of the JSON (ms) | index / scan |\n|---|---|---|---|")
        for label, ours_ms, ref_ms in rows:
            ratio = f"{ours_ms / ref_ms:.4f}" if ref_ms else "-"
            print(f"| {label} | {ours_ms:.2f} | {f'{ref_ms:.0f}' if ref_ms else '-'} | {ratio} |")

        from openmedgemma.bundled import nano_path
        from openmedgemma.eval.tasks import get_task
        from openmedgemma.tokenizer import Tokenizer
        from tests.ehr.scripted import ScriptedNavigatorModel

        tokenizer = Tokenizer.from_pretrained(nano_path())
        count = lambda text: len(tokenizer.encode(text))  # noqa: E731
        task = get_task("ehrqa", data, context="record", per_category=1, records=str(db))
        examples = task.load_examples()
        step = max(1, len(examples) // args.questions)
        sample = examples[::step][: args.questions]
        record_chars = [len(ex.messages[0]["content"]) for ex in sample]
        record_tokens = [count(ex.messages[0]["content"]) for ex in sample]
        agent_chars, agent_tokens = [], []
        for ex in sample:
            model = CountingModel(ScriptedNavigatorModel(), count)
            Navigator(model, store, context_tokens=100_000).ask(ex.meta["patient_id"], ex.meta["question"])
            agent_chars.append(model.prompt_chars)
            agent_tokens.append(model.prompt_tokens)
        med = statistics.median
        print(f"\nprompt size per question, median over {len(sample)} questions (all steps summed for the agent):")
        print("| mode | characters | nano tokens | characters / 4 |\n|---|---|---|---|")
        print(f"| context=record | {med(record_chars):.0f} | {med(record_tokens):.0f} | {med(record_chars) / 4:.0f} |")
        print(f"| context=agent | {med(agent_chars):.0f} | {med(agent_tokens):.0f} | {med(agent_chars) / 4:.0f} |")
        print(f"agent / record (characters): {med(agent_chars) / med(record_chars):.2f}; largest record prompt "
              f"{max(record_chars)} characters")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
