"""`deepliif-engine serve` (kernel.py behind a local EDI endpoint) and `deepliif-engine package`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .package import PROJECT_ROOT, package
from .server import DEFAULT_MAX_BODY, load_kernel, serve_kernel


def add_edi_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run kernel.py behind POST /dlim/v1/inference/<name> on a local "
                           "HTTP server (the EDI runtime stand-in)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", help="deployment name in the URL (default: model.json's name)")
    serve.add_argument("--model-dir", type=Path, default=os.environ.get("DEEPLIIF_MODEL_DIR"),
                       help="default: $DEEPLIIF_MODEL_DIR")
    serve.add_argument("--volume-root", type=Path, default=os.environ.get("DEEPLIIF_VOLUME_ROOT"),
                       help="mounted storage volume (default: $DEEPLIIF_VOLUME_ROOT)")
    serve.add_argument("--kernel", type=Path, default=PROJECT_ROOT / "kernel.py")
    serve.add_argument("--model-json", type=Path, default=PROJECT_ROOT / "model.json")
    serve.add_argument("--task-batch-size", type=int, default=4, help="queued requests handed to one call")
    serve.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_BODY >> 20)
    serve.set_defaults(handler=cmd_serve)

    pack = sub.add_parser("package", help="assemble the folder for `dlim model deploy -p`")
    pack.add_argument("--out", type=Path, required=True)
    pack.add_argument("--model-dir", type=Path)
    pack.add_argument("--with-artifacts", action="store_true", help="include this model's cached artifacts")
    pack.add_argument("--cache-dir", type=Path)
    pack.add_argument("--name", help="deployment name (default: model.json's)")
    pack.set_defaults(handler=cmd_package)


def cmd_serve(args: argparse.Namespace) -> int:
    for name, value in (("DEEPLIIF_MODEL_DIR", args.model_dir), ("DEEPLIIF_VOLUME_ROOT", args.volume_root)):
        if value:
            os.environ[name] = str(Path(value).resolve())
    if args.name:
        os.environ.setdefault("REDHARE_MODEL_NAME", args.name)
    kernel = load_kernel(args.kernel)
    print(f"serving {args.kernel} on http://{args.host}:{args.port}/dlim/v1/inference/"
          f"{args.name or 'deepliif'} (Ctrl-C stops)", flush=True)
    serve_kernel(kernel, args.model_json.read_text(), host=args.host, port=args.port, name=args.name,
                 max_body=args.max_body_mb << 20, task_batch_size=args.task_batch_size)
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    contents = package(args.out, args.model_dir, args.with_artifacts, args.cache_dir, args.name)
    print(f"submission folder {args.out}/: {', '.join(contents['files'])}, packages {', '.join(contents['packages'])}"
          f"{', model/' if contents['model'] else ' (no model: add one under model/)'}"
          f"{', artifacts: ' + '; '.join(contents['artifacts']) if contents['artifacts'] else ''}")
    print("then run:")
    for command in contents["commands"]:
        print(f"  {command}")
    return 0
