"""One summary line for one suite run of .ci/run, from pytest's JUnit XML report; exits non-zero when the run fails.

    python .ci/summary.py LABEL REPORT.xml PYTEST_EXIT_CODE SECONDS [--require-comfyui] [--require-fixtures]
                          [--require-browser] [--require-inductor]

A run fails on a non-zero pytest exit code (5, no test collected, included), a missing report, any failure or
error, and on a skip for want of something the run was given: ComfyUI (--require-comfyui), the golden fixture
(--require-fixtures), Chromium (--require-browser) or the Inductor test's opt-in (--require-inductor). Every skip
is listed with its reason.
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter

#: (flag, words in a skip reason that mean the run lacked it)
REQUIRED = {
    "--require-comfyui": ("ComfyUI not importable", "COMFYUI_PATH"),
    "--require-fixtures": ("golden fixture",),
    "--require-browser": ("Chromium",),
    "--require-inductor": ("DREAMCACHE_INDUCTOR_TEST",),
}


def main(argv: list[str]) -> int:
    label, report, rc, seconds = argv[:4]
    flags = set(argv[4:])
    rc = int(rc)
    problems = []
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"{label}: no report ({e}); pytest exit code {rc}")
        print(f"{label}: 0 passed, 1 failed")
        return 1
    cases = root.iter("testcase")
    counts, skips = Counter(), Counter()
    for case in cases:
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        if "failure" in kinds:
            counts["failed"] += 1
        elif "error" in kinds:
            counts["errors"] += 1
        elif "skipped" in kinds:
            counts["skipped"] += 1
            skipped = case.find("skipped")
            skips[(skipped.get("message") or "").strip()] += 1
        else:
            counts["passed"] += 1
    for flag in flags:
        for reason, n in skips.items():
            if any(w in reason for w in REQUIRED.get(flag, ())):
                problems.append(f"{n} skipped although the run has it: {reason}")
    if rc != 0:
        problems.append(f"pytest exit code {rc}" + (" (no tests collected)" if rc == 5 else ""))
    if counts["passed"] == 0:
        problems.append("no test passed")
    for reason, n in sorted(skips.items()):
        print(f"[ci] {label}: skipped {n}: {reason}")
    for p in problems:
        print(f"[ci] {label}: FAIL: {p}")
    verdict = "FAIL" if problems or counts["failed"] or counts["errors"] else "ok"
    print(f"[ci] {label}: {verdict} in {int(seconds)} s ({counts['errors']} errors)")
    failed = counts["failed"] + counts["errors"]
    print(f"{label}: {counts['passed']} passed, {failed} failed, {counts['skipped']} skipped")
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
