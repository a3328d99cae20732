"""DVC stage check_sources (always run): fingerprints of the data outside the repo.

``fetch_data`` depends on ``--source``, ``evaluate`` on ``--external`` and ``train`` on ``--pretrained``
(see :mod:`faceage.sources`): an edited or added image in a local ``fetch_data.source`` or an
``evaluate.external`` folder, or new bytes in a ``train.pretrained`` weights file, reruns the stage
that reads it; an unchanged one reruns nothing.
"""

import argparse
import logging

from faceage.logs import run_stage, setup_logging

log = logging.getLogger("faceage.sources")


def build_parser() -> argparse.ArgumentParser:
    # yaml, the downloader: imported under run_stage (main calls this), Ctrl-C in them is one line
    from faceage.sources import EXTERNAL_FILE, PRETRAINED_FILE, SOURCE_FILE

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--source", default=SOURCE_FILE, help="fetch_data.source's fingerprint (JSON)")
    parser.add_argument("--external", default=EXTERNAL_FILE, help="evaluate.external's fingerprints (JSON)")
    parser.add_argument("--pretrained", default=PRETRAINED_FILE, help="train.pretrained's fingerprint (JSON)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    from faceage.config import load_params
    from faceage.sources import external_fingerprint, pretrained_fingerprint, refresh, source_fingerprint
    params = load_params(args.params)
    fetch, external = params.fetch_data, list(params.evaluate.external)
    source = refresh(args.source, lambda: source_fingerprint(fetch.source, fetch.md5),
                     {"source": fetch.source, "md5": fetch.md5})
    sets = refresh(args.external, lambda: external_fingerprint(external), {"sources": external})
    pretrained, backbone = params.train.pretrained, params.train.backbone
    # Only a weights file can be missing, so only a file's record may stand for it: a "dlib" record of the
    # same value, written while the backbone was dlib_age, kept the pipeline going to fail in train.
    weights = refresh(args.pretrained, lambda: pretrained_fingerprint(pretrained, backbone),
                      {"pretrained": pretrained, "kind": "file"})
    log.info("fetch_data.source: %s %s; evaluate.external: %s; train.pretrained: %s", source["kind"],
             source.get("sha256", source["md5"] or "(no md5)")[:12],
             ", ".join(f"{s['name']} {s['sha256'][:12]}" for s in sets["sets"]) or "none",
             f"file {weights['sha256'][:12]}" if "sha256" in weights else weights["kind"])


if __name__ == "__main__":
    # SIGTERM (`kill`, `timeout`, a CI job cancelled) stops it as Ctrl-C does: one line, as every stage.
    run_stage(main, interrupt_on_sigterm=True)
