"""`deepliif-engine serve` (kernel.py behind a local EDI endpoint) and `deepliif-engine package`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..settings import process_environment
from ..checkout import PROJECT_ROOT
from .tools.package import package
from .standin.runtime import load_kernel
from .tools.deploy import PROFILE_TEMPLATE, profile_task_batch_size
from .standin.server import serve_dispatcher, serve_kernel
from .kernel.settings import DEFAULT_MAX_REQUEST_MB


def add_edi_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run kernel.py behind POST /dlim/v1/inference/<name> on a local "
                           "HTTP server (the EDI runtime stand-in)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--name", help="deployment name in the URL (default: model.json's name)")
    serve.add_argument("--model-dir", type=Path, default=process_environment().get("DEEPLIIF_MODEL_DIR"),
                       help="default: $DEEPLIIF_MODEL_DIR")
    serve.add_argument("--volume-root", type=Path, default=process_environment().get("DEEPLIIF_VOLUME_ROOT"),
                       help="mounted storage volume (default: $DEEPLIIF_VOLUME_ROOT)")
    serve.add_argument("--kernel", type=Path, default=PROJECT_ROOT / "kernel.py", help="the EDI kernel file to load")
    serve.add_argument("--model-json", type=Path, default=PROJECT_ROOT / "model.json",
                       help="the model.json handed to the kernel")
    serve.add_argument("--task-batch-size", type=int, help="queued requests handed to one call (default: the "
                       f"policy's task_batch_size in the {PROFILE_TEMPLATE} beside --kernel, as EDI does)")
    serve.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_REQUEST_MB, help="largest request body, MB")
    serve.add_argument("--kernels", type=int, default=1, help="kernel processes behind the endpoint, each on its own "
                       "GPU when there are several; they share the volume, status records and artifact cache")
    serve.set_defaults(handler=cmd_serve)

    overhead = sub.add_parser("edi-bench", help="the EDI kernel's overhead on top of inference, per request")
    overhead.add_argument("--model-dir", type=Path, required=True, help="DeepLIIF model directory")
    overhead.add_argument("--images", type=Path, nargs="+", help="default: the sample tiles")
    overhead.add_argument("--repeats", type=int, default=3, help="requests per image")
    overhead.add_argument("--backend", default="auto", help="engine backend")
    overhead.add_argument("--device", default="auto", help="auto, cpu or cuda")
    overhead.add_argument("--cache-dir", type=Path, help="artifact cache (default: the user cache dir)")
    overhead.set_defaults(handler=cmd_edi_bench)

    hostile = sub.add_parser("edi-hostile-bench", help="the kernel under malformed requests, a connection burst "
                             "and a large async job beside sync requests (loopback only, bounded)")
    hostile.add_argument("--model-dir", type=Path, required=True, help="DeepLIIF model directory")
    hostile.add_argument("--burst", type=int, default=64, help="simultaneous connections")
    hostile.add_argument("--sync-requests", type=int, default=12, help="sync requests per latency sample")
    hostile.add_argument("--big-side", type=int, default=4096, help="side of the async job's image, pixels")
    hostile.add_argument("--backend", default="auto", help="engine backend")
    hostile.add_argument("--device", default="auto", help="auto, cpu or cuda")
    hostile.add_argument("--cache-dir", type=Path, help="artifact cache (default: the user cache dir)")
    hostile.add_argument("--json", type=Path, help="also write the report here")
    hostile.set_defaults(handler=cmd_hostile_bench)

    pack = sub.add_parser("package", help="assemble the folder for `dlim model deploy -p`")
    pack.add_argument("--out", type=Path, required=True, help="the submission folder to create")
    pack.add_argument("--model-dir", type=Path, help="model to ship under model/ (default: none)")
    pack.add_argument("--with-weights", action="store_true", help="ship the model's weights under model/ (default: "
                      "left out; kernels fetch them from the volume, see upload-model)")
    pack.add_argument("--model-source", help="where kernels fetch the model at start: volume:PATH from "
                      "upload-model (set as DEEPLIIF_MODEL_SOURCE in model.json)")
    pack.add_argument("--with-artifacts", action="store_true", help="include this model's cached artifacts")
    pack.add_argument("--cache-dir", type=Path, help="artifact cache to take artifacts from (default: the "
                      "user cache dir)")
    pack.add_argument("--name", help="deployment name (default: model.json's)")
    pack.add_argument("--onnx", type=Path, help="ship this fused ONNX from `export onnx` (with --model-dir) so "
                      "kernels serve it without exporting")
    pack.set_defaults(handler=cmd_package)


def cmd_serve(args: argparse.Namespace) -> int:
    environment = dict(process_environment())  # the kernel's settings: this process's environment plus the options
    for name, value in (("DEEPLIIF_MODEL_DIR", args.model_dir), ("DEEPLIIF_VOLUME_ROOT", args.volume_root)):
        if value:
            environment[name] = str(Path(value).resolve())
    if args.name:
        environment.setdefault("REDHARE_MODEL_NAME", args.name)
    name = args.name or json.loads(args.model_json.read_text()).get("name", "deepliif")
    if args.task_batch_size is None:
        args.task_batch_size = profile_task_batch_size(args.kernel.resolve().parent / PROFILE_TEMPLATE)
    print(f"serving {args.kernel} ({args.kernels} kernel{'s' if args.kernels > 1 else ''}) on "
          f"http://{args.host}:{args.port}/dlim/v1/inference/{name} (Ctrl-C stops)", flush=True)
    if args.kernels > 1:
        return _serve_pool(args, environment, name)
    kernel = load_kernel(args.kernel)
    serve_kernel(kernel, args.model_json.read_text(), host=args.host, port=args.port, name=args.name,
                 max_body=args.max_body_mb << 20, task_batch_size=args.task_batch_size, environment=environment)
    return 0


def _serve_pool(args: argparse.Namespace, environment: dict[str, str], name: str) -> int:
    from .standin.kernel_pool import KernelPool, default_log_dir, kernel_argv
    argv = kernel_argv(args.kernel.resolve(), args.model_json.resolve(), args.name, args.task_batch_size,
                       args.max_body_mb)
    pool = KernelPool(args.kernels, argv, environment, name, default_log_dir(environment), args.kernel.resolve().parent)
    pool.start()
    serve_dispatcher(pool, name, args.host, args.port, args.max_body_mb << 20)
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    contents = package(args.out, args.model_dir, args.with_artifacts, args.cache_dir, args.name, args.onnx,
                       args.with_weights, args.model_source)
    print(f"submission folder {args.out}/: {', '.join(contents['files'])}, packages {', '.join(contents['packages'])}"
          f"{', model/' if contents['weights_included'] else ''}"
          f"{', artifacts: ' + '; '.join(contents['artifacts']) if contents['artifacts'] else ''}")
    if contents["model"] and not contents["weights_included"] and not args.model_source:
        print(f"weights left out ({contents['weights_bytes'] / 1e6:.1f} MB saved): put them on the volume with "
              "`deepliif-engine upload-model` and set DEEPLIIF_MODEL_SOURCE, or pass --with-weights")
    elif not contents["model"] and not args.model_source:
        print("no model given: kernels need DEEPLIIF_MODEL_SOURCE (upload-model) or a model under model/")
    print("then run:")
    for command in contents["commands"]:
        print(f"  {command}")
    return 0


def cmd_hostile_bench(args: argparse.Namespace) -> int:
    from deepliif.imageio import write_json

    from .standin.hostile_bench import run_hostile_bench
    report = run_hostile_bench(args.model_dir, args.cache_dir, args.backend, args.device, args.burst,
                               args.sync_requests, args.big_side)
    if args.json:
        write_json(args.json, report)
    malformed, burst = report["malformed"], report["burst"]
    print(f"malformed: {malformed['answered_with_json_error']}/{malformed['tried']} answered with a JSON error; "
          f"burst: {burst['answered']}/{burst['connections']} connections answered")
    for label, key in (("sync alone", "sync_alone"), ("sync beside a large async job", "sync_beside_async")):
        sample = report[key]
        print(f"{label}: p50 {sample['p50_seconds']} s, p95 {sample['p95_seconds']} s over {sample['n']} requests")
    print(f"async job ({report['async_job']['side']}^2) was {report['async_status_after_sync']} when the sync "
          f"requests were done; peak RSS {report['peak_rss_gib']} GiB (server and client, one process)")
    every_answered = malformed["answered_with_json_error"] == malformed["tried"] and \
        burst["answered"] == burst["connections"]
    return 0 if every_answered else 1


def cmd_edi_bench(args: argparse.Namespace) -> int:
    import statistics

    from deepliif.tables import format_rows

    from ..samples import sample_images
    from .standin.demo import measure_overhead
    images = args.images or sample_images(args.sample_dir)
    rows = measure_overhead(args.model_dir, images, args.cache_dir, args.backend, args.device, args.repeats)
    table = [("mode", "requests", "engine s (median)", "read+decode s", "write s", "overhead s (median / max)",
              "HTTP+JSON s (median)")]
    for mode in ("base64", "path"):
        mine = [r for r in rows if r["mode"] == mode]
        table.append((mode, str(len(mine)), f"{statistics.median(r['engine_seconds'] for r in mine):.3f}",
                      f"{statistics.median(r['read_decode_seconds'] for r in mine):.3f}",
                      f"{statistics.median(r['write_seconds'] for r in mine):.3f}",
                      f"{statistics.median(r['overhead_seconds'] for r in mine):.3f} / "
                      f"{max(r['overhead_seconds'] for r in mine):.3f}",
                      f"{statistics.median(r['transport_seconds'] for r in mine):.3f}"))
    print("\n".join(format_rows(table)))
    return 0
