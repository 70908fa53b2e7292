"""`openmedgemma ehr`: index FHIR bundles, list patients, ask the EHR navigator, generate EHRQA questions.

    openmedgemma ehr index shared/data/synthea_fhir_r4 --db records.sqlite
    openmedgemma ehr patients --records records.sqlite
    openmedgemma ehr ask --records records.sqlite --patient ID "Which medications is the patient on?" --trace
    openmedgemma ehr ask --records http://127.0.0.1:8080/fhir --patient ID "..." --endpoint http://127.0.0.1:8000/v1
    openmedgemma ehr questions --records records.sqlite --out ehrqa.jsonl

Top-level imports stay light (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys


def _records_arg(parser) -> None:
    parser.add_argument("--records", required=True, nargs="+", metavar="RECORDS",
                        help="an index made by `ehr index`, FHIR bundle files / folders (indexed in memory), or a "
                             "FHIR R4 server URL")  # fmt: skip
    parser.add_argument("--fhir-token", metavar="TOKEN", help="bearer token for a FHIR server URL")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("ehr", help="FHIR records: index, patients, ask the EHR navigator, EHRQA questions",
                                   description="The EHR navigator over FHIR R4 records (Synthea bundles, an index, "
                                   "or a FHIR server). The nano demo model is not for clinical use.")  # fmt: skip
    sub = parser.add_subparsers(dest="ehr_command", metavar="SUBCOMMAND")

    index = sub.add_parser("index", help="index FHIR bundles (json / ndjson files or folders) into an SQLite file")
    index.add_argument("bundles", nargs="+", metavar="BUNDLE")
    index.add_argument("--db", required=True, help="the index file (created, or added to)")
    index.add_argument("--no-progress", action="store_true")
    index.set_defaults(func=run_index)

    patients = sub.add_parser("patients", help="list the patients of the records")
    _records_arg(patients)
    patients.add_argument("--json", action="store_true", help="one JSON object per line")
    patients.set_defaults(func=run_patients)

    ask = sub.add_parser("ask", help="answer a question about one patient with the EHR navigator")
    _records_arg(ask)
    ask.add_argument("--patient", required=True, metavar="ID", help="the Patient id (see `ehr patients`)")
    ask.add_argument("question")
    ask.add_argument("--model", help="model folder (default: the bundled nano MedGemma, a demonstration model)")
    ask.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible server instead of --model")
    ask.add_argument("--api-key", metavar="KEY", help="API key for --endpoint")
    ask.add_argument("--served-model", metavar="NAME", help="model id on --endpoint (default: the server's first)")
    ask.add_argument("--context-tokens", type=int, default=8192,
                     help="the endpoint model's context length (default 8192; a local model's own is used)")
    ask.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model reply (default 512)")
    ask.add_argument("--types", help="comma-separated resource types to consider (default: all in the record)")
    ask.add_argument("--no-tools", action="store_true",
                     help="use the JSON-in-prompt protocol even where the server has tools")
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--trace", action="store_true", help="print the tool calls and model replies (stderr)")
    ask.add_argument("--json", action="store_true", help="print the whole result as JSON")
    ask.set_defaults(func=run_ask)

    questions = sub.add_parser("questions", help="generate EHRQA-style questions with ground truth (JSONL)")
    _records_arg(questions)
    questions.add_argument("--out", required=True, help="the JSONL file to write")
    questions.add_argument("--seed", type=int, default=0)
    questions.add_argument("--per-category", type=int, default=2, help="questions per category per patient")
    questions.set_defaults(func=run_questions)
    parser.set_defaults(func=lambda args: parser.print_help() or 1)
    return parser


def _store(args):
    from openmedgemma.ehr.store import open_store

    return open_store(args.records, token=args.fhir_token, progress=sys.stderr.isatty())


def run_index(args) -> int:
    import time
    from pathlib import Path

    from openmedgemma.ehr.sqlite import SQLiteStore, build_index

    start = time.perf_counter()
    build_index(args.bundles, args.db, progress=not args.no_progress).close()
    with SQLiteStore(args.db) as store:
        counts = store.counts()
    size = Path(args.db).stat().st_size
    print(f"{args.db}: {sum(counts.values())} resources ({counts.get('Patient', 0)} patients) in "
          f"{time.perf_counter() - start:.1f} s, {size / 1e6:.1f} MB")  # fmt: skip
    for rtype, n in counts.items():
        print(f"  {rtype:<24} {n}")
    return 0


def run_patients(args) -> int:
    with _store(args) as store:
        for p in store.patients():
            print(json.dumps(p) if args.json else f"{p['id']}  {p['name']}  {p['gender']}  {p['birthDate']}")
    return 0


def _chat_model(args):
    from openmedgemma.errors import ConfigError

    if args.endpoint and args.model:
        raise ConfigError("give --model or --endpoint, not both")
    if args.endpoint:
        from openmedgemma.eval.endpoint import OpenAIChatModel

        return OpenAIChatModel(args.endpoint, api_key=args.api_key, model=args.served_model)
    from openmedgemma.bundled import model_or_nano
    from openmedgemma.eval.loaders import load_chat_model

    return load_chat_model(str(model_or_nano(args.model, "medgemma", "openmedgemma ehr ask")))


def run_ask(args) -> int:
    from openmedgemma.ehr.agent import Navigator

    with _store(args) as store:
        store.patient(args.patient)  # an unknown patient fails before a model is loaded
        model = _chat_model(args)
        navigator = Navigator(model, store, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              context_tokens=args.context_tokens,
                              use_tools=False if args.no_tools else None)  # fmt: skip
        types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
        result = navigator.ask(args.patient, args.question, types=types)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return 0
    if args.trace:
        for entry in result.trace:
            print(json.dumps(entry, ensure_ascii=False), file=sys.stderr)
    print(result.answer)
    print("\ncitations (retrieved): " + (", ".join(result.citations) or "none"))
    if result.unverified_citations:
        print("cited but never retrieved (check these): " + ", ".join(result.unverified_citations))
    print(f"resources read: {len(result.evidence)} in {', '.join(result.summaries) or 'no type'}")
    return 0


def run_questions(args) -> int:
    from collections import Counter

    from openmedgemma.ehr.questions import generate_questions, write_questions

    with _store(args) as store:
        found = generate_questions(store, seed=args.seed, per_category=args.per_category)
    write_questions(found, args.out)
    print(f"{args.out}: {len(found)} questions")
    for category, n in sorted(Counter(q.category for q in found).items()):
        print(f"  {category:<26} {n}")
    return 0
