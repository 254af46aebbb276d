"""`deepliif-engine upload-model`, `deploy` and `submit`: from a model directory to a cohort's results."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from deepliif.errors import ArgumentError

from ..settings import process_environment


def add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    upload = sub.add_parser("upload-model", help="put a model directory and its sha256 manifest on the storage "
                            "volume, for kernels to fetch at start (DEEPLIIF_MODEL_SOURCE=volume:PATH)")
    upload.add_argument("--model-dir", type=Path, required=True, help="DeepLIIF model directory")
    upload.add_argument("--to", required=True, metavar="VOLUME_PATH", help="folder on the volume, relative to its root")
    upload.add_argument("--volume-root", type=Path, default=process_environment().get("DEEPLIIF_VOLUME_ROOT"),
                        help="mounted volume (default: $DEEPLIIF_VOLUME_ROOT; or the DEEPLIIF_CPD_* settings)")
    upload.set_defaults(handler=cmd_upload_model)

    deploy = sub.add_parser("deploy", help="run WMLA's dlim sequence for a packaged folder: deploy, viewprofile, "
                            "profile edited from model-profile.json, updateprofile, start")
    deploy.add_argument("package_dir", type=Path, help="the folder `deepliif-engine package` made")
    deploy.add_argument("--name", help="deployment name (default: the folder's model.json name)")
    deploy.add_argument("--rest-server", help="dlim's REST server, e.g. https://<cpd route>/dlim/v1/")
    deploy.add_argument("--jwt-token", help="token for dlim (default: $USER_ACCESS_TOKEN)")
    deploy.add_argument("--dry-run", action="store_true", help="print the dlim commands and the profile edit only")
    deploy.add_argument("--kernel-min", type=int, help="kernels always running (policy.kernel_min)")
    deploy.add_argument("--kernel-max", type=int, help="kernels to scale up to, -1 unlimited (policy.kernel_max)")
    deploy.add_argument("--ncpus", type=int, help="CPUs per kernel (limit: twice this)")
    deploy.add_argument("--mem-mb", type=int, help="memory per kernel, MB (limit: twice this)")
    deploy.add_argument("--task-execution-timeout", type=int, help="seconds a task may run (policy)")
    deploy.add_argument("--task-batch-size", type=int, help="tasks handed to one kernel call (policy)")
    deploy.add_argument("--dlim", default="dlim", help="the dlim executable")
    deploy.set_defaults(handler=cmd_deploy)

    submit = sub.add_parser("submit", help="a cohort through an EDI endpoint: async requests, bounded concurrency, "
                            "retries, a journal to resume from, OUT/cohort.csv")
    submit.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (sent inline) and volume:PATH "
                        "(images or slides on the endpoint's volume)")
    submit.add_argument("--endpoint", required=True, help="http(s)://host[:port]/dlim/v1/inference/<name>")
    submit.add_argument("--out", type=Path, required=True, help="cohort folder: journal, cohort.csv, inline outputs")
    submit.add_argument("--token", help="bearer token (default: $USER_ACCESS_TOKEN when set; a local serve needs "
                        "none)")
    submit.add_argument("--concurrency", type=int, default=4, help="inputs in flight at once")
    submit.add_argument("--poll-s", type=float, default=2.0, help="seconds between status requests")
    submit.add_argument("--retry-for-s", type=float, default=300.0, help="how long to keep retrying an endpoint "
                        "that does not answer (then the input stays pending)")
    submit.add_argument("--max-inline-mb", type=float, default=16.0, help="largest file sent inline")
    submit.add_argument("--tile-size", type=int, help="tile_size of every request")
    submit.add_argument("--images-to-return", choices=("all", "modalities", "seg_masks"), help="images_to_return")
    submit.add_argument("--no-verify-tls", action="store_true", help="accept a self-signed certificate")
    submit.add_argument("--no-progress", action="store_true", help="no progress bar")
    submit.set_defaults(handler=cmd_submit)


def cmd_upload_model(args: argparse.Namespace) -> int:
    from .kernel.model_store import VOLUME_PREFIX, upload_model
    from .kernel.settings import cpd_from_environment
    from .kernel.storage import open_volume
    volume = open_volume(str(args.volume_root) if args.volume_root else None, cpd_from_environment(process_environment()))
    if volume is None:
        raise ArgumentError("no volume: give --volume-root (a mounted volume) or set the DEEPLIIF_CPD_* settings")
    manifest = upload_model(args.model_dir, volume, args.to)
    print(f"uploaded {len(manifest['files'])} files ({manifest['total_bytes'] / 1e6:.1f} MB) and "
          f"model-manifest.json to {volume.describe(args.to)}")
    print(f"kernels fetch it at start with DEEPLIIF_MODEL_SOURCE={VOLUME_PREFIX}{args.to} (package --model-source)")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    import json

    from .tools.deploy import TOKEN_ENV, Deployment, DlimConnection, ProfileSettings
    token = args.jwt_token or process_environment().get(TOKEN_ENV)
    connection = DlimConnection(args.rest_server, token, token_from_env=not args.jwt_token and bool(token))
    profile = ProfileSettings(args.kernel_min, args.kernel_max, args.ncpus, args.mem_mb, args.task_execution_timeout,
                              args.task_batch_size)
    deployment = Deployment(args.package_dir, args.name, connection, profile, args.dlim)
    if args.dry_run:
        print("\n".join(deployment.dry_run()))
        return 0
    sent = deployment.run()
    print(f"deployed and started {deployment.name}; profile sent: {json.dumps(sent)}")
    print(f"first request: deepliif-engine submit --endpoint <route>/dlim/v1/inference/{deployment.name} "
          "--out OUT IMAGE...")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .tools.client import EdiClient
    from .tools.cohort import Cohort, CohortInput, CohortOptions
    inputs = [CohortInput.parse(text) for text in args.inputs]
    options = CohortOptions(args.concurrency, int(args.max_inline_mb * (1 << 20)), args.poll_s, args.tile_size,
                            args.images_to_return)
    token = args.token or process_environment().get("USER_ACCESS_TOKEN")  # not a parser default: --help would print it
    client = EdiClient(args.endpoint, token, not args.no_verify_tls, args.retry_for_s)
    cohort = Cohort(inputs, args.out, client, options)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop ends the run as Ctrl-C does: journal and table kept
    with tqdm(total=len(inputs), unit="input", disable=args.no_progress, desc="cohort") as bar:
        try:
            counts = cohort.run(on_done=lambda: bar.update(1))
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted: {cohort.summary()}")
            return 130
    print(cohort.summary())
    return 0 if counts["pending"] == 0 and counts["failed"] == 0 else 1


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt
