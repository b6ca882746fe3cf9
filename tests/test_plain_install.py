"""`cm3rt generate` on the embedded default model needs only the plain install: not the
demo wing (cm3rt.demo) nor its extra (scipy)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_generate_without_the_demo_extra(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["scipy"] = None  # as if `pip install -e .` without [eval]: import fails
        from cm3rt import cli
        code = cli.main(["generate", "a red circle", "-o", {str(tmp_path / "x.png")!r},
                         "--no-progress"])
        assert code == 0, code
        demo = sorted(m for m in sys.modules if m.startswith("cm3rt.demo"))
        assert not demo, demo
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    assert (tmp_path / "x.png").is_file()


def test_eval_without_the_extra_says_how_to_get_it(tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["scipy"] = None
        from cm3rt import cli
        sys.exit(cli.main(["eval", "--quick"]))
    """)
    r = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "cm3rt eval: error: cm3rt eval needs the demo extra: pip install 'cm3rt[eval]'"]
