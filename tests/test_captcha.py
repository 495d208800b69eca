"""captcha pipeline end to end: generate -> prepare -> train -> eval, plus bad input."""
import asyncio
import contextlib
import csv
import io
import errno
import json
import os
import pty
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (ROOT, assert_one_line_error, check_onnx, hostile_images, http, load_script, multipart,
                      png_declaring, run, run_main, same_answers, serving, tree_bytes)

GENERATE = "generate-captcha/generate.py"
N_CAPTCHAS = 400


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("captcha")


@pytest.fixture(scope="module")
def generated(tmp):
    out = tmp / "generated"
    proc = run(GENERATE, "--count", N_CAPTCHAS, "--output", out, "--workers", 2, "--seed", 3)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\d+ images/s", proc.stdout)
    return out


@pytest.fixture(scope="module")
def image_dir(tmp, generated):
    """The generated captchas plus images and files a real folder may hold, good and bad."""
    folder = tmp / "images"
    shutil.copytree(generated, folder)
    first = sorted(generated.iterdir())[0]
    img = Image.open(first).convert("RGB")
    img.convert("RGBA").save(folder / "90000-rgba.png")              # RGBA: kept
    img.save(folder / "90001-g1f5.png", format="GIF")                  # GIF bytes in a .png: kept
    img.convert("L").save(folder / "90002-gray.jpg")                   # grayscale JPEG: kept
    (folder / "90003-abcd.png").write_text("not an image")             # unreadable: skipped
    img.save(folder / "90004-abcdefghijklmnopq.png")                   # 17 characters: skipped
    img.save(folder / "90005-ab cd.png")                               # a space in the code: skipped
    img.save(folder / "90006-.png")                                    # no code in the name: skipped
    (folder / "notes.txt").write_text("hello")                         # not an image file: skipped
    return folder


def limit_open_files():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@pytest.fixture(scope="module")
def prepared(tmp, image_dir):
    """Prepared with 2 decoding processes and at most 256 open files (fewer than images: what a worker
    sends back must not hold a file descriptor)."""
    data = tmp / "data"
    proc = subprocess.run([sys.executable, str(ROOT / "captcha.py"), "prepare", "--image-dir", str(image_dir),
                           "--data-dir", str(data), "--workers", "2"], capture_output=True, text=True,
                          cwd=ROOT, preexec_fn=limit_open_files, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return data, proc


@pytest.fixture(scope="module")
def trained(prepared):
    data, _ = prepared
    proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 2, "--epoch-size", 600, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return data, proc


# ---- generator ----
def test_generator_names_sizes_and_determinism(tmp, generated):
    names = sorted(p.name for p in generated.iterdir())
    assert len(names) == N_CAPTCHAS
    assert all(re.fullmatch(r"\d{5}-[2-9a-hkmnp-zA-HJKMNP-Z]{4}\.png", n) for n in names), names[:5]
    assert [int(n[:5]) for n in names] == list(range(N_CAPTCHAS))
    for p in sorted(generated.iterdir())[:20]:
        assert Image.open(p).size == (120, 50)
    codes = "".join(n[6:10] for n in names)
    digits = sum(c.isdigit() for c in codes) / len(codes)
    assert 0.4 < digits < 0.6  # a digit with probability 1/2

    one = tmp / "one_worker"
    assert run(GENERATE, "--count", 50, "--output", one, "--workers", 1, "--seed", 3).returncode == 0
    for p in sorted(one.iterdir()):
        assert (generated / p.name).read_bytes() == p.read_bytes()
    other = tmp / "other_seed"
    assert run(GENERATE, "--count", 50, "--output", other, "--seed", 4).returncode == 0
    assert {p.name for p in other.iterdir()} != {p.name for p in one.iterdir()}


def test_generator_clean_where_the_disk_ignores_case(tmp, monkeypatch):
    """--clean on a disk that ignores case (macOS, Windows): an old captcha named like a new one but for case is the
    new file by then, and stays (it was unlinked after the swap: the run said 3 written and left 2). The disk is
    simulated: an old name that matches a new one but for case becomes a second name of the new file, and removing
    either name removes both. main() runs twice in one process (the --output lock is let go at the end of a run)."""
    gen = load_script(GENERATE)
    probe, out = tmp / "case-probe", tmp / "case-out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert gen.main(["--count", "3", "--output", str(probe), "--workers", "1", "--seed", "1"]) == 0
        assert gen.main(["--count", "3", "--output", str(out), "--workers", "1", "--seed", "0"]) == 0
    new = sorted(p.name for p in probe.iterdir())
    [first] = out.glob("00000-*.png")
    assert new[0][6:10].lower() != new[0][6:10].upper()   # a code with letters
    first.rename(out / (new[0][:6] + new[0][6:10].swapcase() + ".png"))   # an old captcha: a new name but for case
    real_replace, real_unlink = os.replace, Path.unlink

    def replace_ignoring_case(src, dst):
        real_replace(src, dst)
        for p in Path(dst).parent.iterdir():
            if p.name != Path(dst).name and p.name.lower() == Path(dst).name.lower():
                real_unlink(p)
                os.link(dst, p)

    def unlink_ignoring_case(path, missing_ok=False):
        for p in [p for p in path.parent.iterdir() if p.name.lower() == path.name.lower()] or [path]:
            real_unlink(p, missing_ok=missing_ok)
    monkeypatch.setattr(gen.os, "replace", replace_ignoring_case)
    monkeypatch.setattr(Path, "unlink", unlink_ignoring_case)
    with contextlib.redirect_stdout(io.StringIO()):
        assert gen.main(["--count", "3", "--output", str(out), "--workers", "1", "--seed", "1", "--clean"]) == 0
    monkeypatch.undo()
    assert all((out / name).read_bytes() == (probe / name).read_bytes() for name in new)


def test_generator_ctrl_c_while_it_imports(tmp):
    """Ctrl-C while generate.py imports its libraries (the first fraction of a second): status 130 and one line, no
    traceback. The Ctrl-C lands at the import of matplotlib, every time (an import hook raises it there)."""
    hook = ("import runpy, sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'matplotlib':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            f"sys.argv = [{str(ROOT / GENERATE)!r}, '--count', '3', '--output', {str(tmp / 'never')!r}]\n"
            f"runpy.run_path({str(ROOT / GENERATE)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", hook], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted" and not (tmp / "never").exists(), proc.stderr


def test_generator_refuses_to_mix_runs(tmp, generated):
    out = tmp / "mixed"
    assert run(GENERATE, "--count", 5, "--output", out).returncode == 0
    assert_one_line_error(run(GENERATE, "--count", 3, "--output", out, "--seed", 1), 2)
    assert run(GENERATE, "--count", 3, "--output", out, "--seed", 1, "--clean").returncode == 0
    assert len(list(out.iterdir())) == 3
    (tmp / "a-file").write_text("not a folder")
    assert "--output" in assert_one_line_error(run(GENERATE, "--count", 3, "--output", tmp / "a-file"), 2)
    (out / "00009-abcd.png").mkdir()   # named like a captcha, not written by a run: never removed, one line
    (out / "00042-8cA6.png").write_bytes(b"a captcha the user labelled")
    line = assert_one_line_error(run(GENERATE, "--count", 3, "--output", out, "--clean"), 2)
    assert "2 files named like captchas that no earlier run wrote there" in line
    assert (out / "00042-8cA6.png").read_bytes() == b"a captcha the user labelled" and len(list(out.iterdir())) == 5


@pytest.mark.parametrize("workers", [1, 2])
def test_generator_sigterm_stops_every_worker(tmp, workers):
    """A kill ends generate.py as Ctrl-C does: status 143, "terminated", no temp file; with --workers 2 its workers
    (all its descendants) stop with it (they used to go on writing, then print tracebacks)."""
    out = tmp / f"killed{workers}"
    proc = subprocess.Popen([sys.executable, GENERATE, "--count", "20000", "--output", str(out), "--workers",
                             str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while len(list(out.glob(".generate-*/*.png"))) < 50 and time.time() < deadline:   # drawn aside, then put in
        time.sleep(0.05)
    assert len(list(out.glob(".generate-*/*.png"))) >= 50   # killed while drawing, not before it began
    children, parents = [], [str(proc.pid)]
    while parents:   # every descendant: a forkserver's workers are its children, not the command's
        found = [pid for p in parents for pid in
                 (Path(f"/proc/{p}/task/{p}/children").read_text().split() if Path(f"/proc/{p}").exists() else [])]
        children, parents = children + found, found
    assert len(children) >= (workers if workers > 1 else 0)   # --workers 1 draws in the command itself
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    time.sleep(1)
    assert proc.returncode == 143 and err.strip().endswith("terminated") and "Traceback" not in err, err
    assert not out.exists()   # no half set, no temporary file, nothing a later worker wrote, not the folder it made
    running = [pid for pid in children if Path(f"/proc/{pid}/stat").exists()
               and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not running   # the workers stopped with it (left behind, they held the --output lock)


def test_generator_worker_killed_is_one_line(tmp):
    """A worker killed outright (the system's out-of-memory killer) ends the run in one line and status 1, nothing
    written (multiprocessing.Pool waited for its lost chunk forever)."""
    out = tmp / "oom"
    proc = subprocess.Popen([sys.executable, GENERATE, "--count", "20000", "--output", str(out), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while len(list(out.glob(".generate-*/*.png"))) < 50 and time.time() < deadline:
        time.sleep(0.05)
    try:
        worker = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
        os.kill(int(worker), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "a worker process died" in err and "Traceback" not in err, err
    assert not out.exists()   # the folder this run made, left empty, goes too


def test_generator_with_spawned_workers(tmp):
    """macOS and Windows start the pool's workers by spawn: they never had the --output lock's descriptor, and closing
    the descriptor of that number broke the pool ("a worker process died")."""
    code = ("import multiprocessing, os, runpy, sys; multiprocessing.set_start_method('spawn'); "
            "[os.open(os.devnull, os.O_RDONLY) for _ in range(3)]; "   # the lock: a number no worker has
            f"sys.argv = ['generate.py', '--count', '400', '--workers', '2', '--output', {str(tmp / 'spawned')!r}]; "
            f"runpy.run_path({str(GENERATE)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp / "spawned").glob("*.png"))) == 400


def test_generator_keeps_the_old_set_until_the_new_one_is_complete(tmp):
    """A --clean run is drawn aside: killed midway, the old captchas are all there (they were deleted first); a
    second generator on the same folder meanwhile stops at once (both wrote, under the same numbers); the staging
    folder of a run killed outright is cleared by the next."""
    out = tmp / "swap"
    (out / ".generate-99999").mkdir(parents=True)   # the staging folder of a run killed outright (SIGKILL)
    (out / ".generate-99999" / "00000-abcd.png").write_bytes(b"drawn before the kill")
    (out / ".generate-notes").mkdir()   # a user's own folder of that name: not a staging folder, never removed
    (out / ".generate-notes" / "todo.txt").write_text("precious")
    os.mkfifo(out / "00001-abcd.png")   # named like a captcha, a FIFO: not read (it blocked the run forever)
    line = assert_one_line_error(run(GENERATE, "--count", 20, "--output", out, "--seed", 1, "--workers", 1,
                                     timeout=60), 2)
    assert "00001-abcd.png" in line and "no earlier run wrote there" in line
    (out / "00001-abcd.png").unlink()
    assert run(GENERATE, "--count", 20, "--output", out, "--seed", 1, "--workers", 1).returncode == 0
    assert (out / ".generate-notes" / "todo.txt").read_text() == "precious" and not (out / ".generate-99999").exists()
    shutil.rmtree(out / ".generate-notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 20   # the stale staging folder cleared
    proc = subprocess.Popen([sys.executable, GENERATE, "--count", "20000", "--output", str(out), "--clean",
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while len(list(out.glob(".generate-*/*.png"))) < 20 and time.time() < deadline:
        time.sleep(0.05)
    line = assert_one_line_error(run(GENERATE, "--count", 5, "--output", out, "--clean", "--workers", 1), 2)
    assert "another generate.py is writing there" in line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


SIGTERM_AT_RENAME = """
import os, runpy, signal, sys
real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == int(os.environ["SIGTERM_AT_RENAME"]):
        os.kill(os.getpid(), signal.SIGTERM)   # a scheduler's stop, at the first rename of the swap
    return real_replace(src, dst)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_generator_swap_is_never_cut(tmp):
    """A SIGTERM during the final swap of a --clean run waits for it: status 143, and the folder holds the new set
    whole, of another count and length, none of the old (an interrupt there lost the old set and most of the new)."""
    out = tmp / "cut"
    assert run(GENERATE, "--count", 8, "--output", out, "--workers", 1).returncode == 0
    old = {p.name for p in out.iterdir()}
    env = dict(os.environ, SIGTERM_AT_RENAME="6")   # 5 renames as the 5 captchas are drawn, then the swap
    proc = subprocess.run([sys.executable, "-c", SIGTERM_AT_RENAME, str(ROOT / GENERATE), "--count", "5", "--length",
                           "5", "--seed", "3", "--output", str(out), "--workers", "1", "--clean"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == "terminated", proc.stderr
    new = {p.name for p in out.iterdir()}
    assert len(new) == 5 and not new & old and all(len(name.split("-")[1]) == 9 for name in new)   # CODE.png


def test_generator_killed_in_its_swap(tmp):
    """A SIGKILL during the swap of a --clean run left some of each set (prepare trained on the mix): prepare refuses
    the folder, and the next generate.py run on it finishes the swap the killed one began (the new set whole)."""
    out = tmp / "killed-swap"
    assert run(GENERATE, "--count", 8, "--output", out, "--workers", 1).returncode == 0
    old = {p.name for p in out.iterdir()}
    env = dict(os.environ, SIGTERM_AT_RENAME="8")   # 5 as the captchas are drawn, the swap's mark, 1 captcha in
    killing = SIGTERM_AT_RENAME.replace("SIGTERM)", "SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", killing, str(ROOT / GENERATE), "--count", "5", "--length", "5",
                           "--seed", "3", "--output", str(out), "--workers", "1", "--clean"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    mixed = {p.name for p in out.glob("*.png")}
    assert len(mixed & old) == 8 and len(mixed - old) == 1
    line = assert_one_line_error(run("captcha.py", "prepare", "--image-dir", out, "--data-dir", tmp / "swap-data"), 1)
    assert "holds some of each set" in line and not (tmp / "swap-data").exists()
    proc = run(GENERATE, "--count", 3, "--output", out, "--workers", 1)   # without --clean: it stops after that
    assert "its 5 captchas put in place" in proc.stderr and "already holds 5 captchas" in proc.stderr
    new = {p.name for p in out.iterdir()}   # no mark, no staging folder left
    assert len(new) == 5 and not new & old and all(len(name.split("-")[1]) == 9 for name in new)
    (out / ".generate-swap").mkdir()   # not a mark it wrote: one line (it was a traceback)
    line = assert_one_line_error(run(GENERATE, "--count", 3, "--output", out, "--workers", 1, "--clean"), 2)
    assert ".generate-swap is not a file generate.py wrote" in line
    (out / ".generate-swap").rmdir()   # a mark whose staging folder is gone: the old set is never removed for it
    (out / ".generate-swap").write_text(".generate-77777\n00099-abcde.png\n")
    line = assert_one_line_error(run(GENERATE, "--count", 3, "--output", out, "--workers", 1), 2)
    assert "1 of its new captchas are gone; run again with --clean" in line
    assert {p.name for p in out.glob("*.png")} == new
    assert run(GENERATE, "--count", 3, "--output", out, "--workers", 1, "--clean").returncode == 0
    assert len(list(out.iterdir())) == 3 and not list(out.glob(".*"))


def test_generator_swap_that_fails_is_finished_next_time(tmp):
    """A rename that fails in the swap (an I/O error): one line, and the staging folder stays with the mark, so the
    next run puts the new set in place (the staging folder went and the next run removed the old set for nothing)."""
    out = tmp / "failed-swap"
    assert run(GENERATE, "--count", 8, "--output", out, "--workers", 1).returncode == 0
    old = {p.name for p in out.iterdir()}
    failing = SIGTERM_AT_RENAME.replace("os.kill(os.getpid(), signal.SIGTERM)", "raise OSError(5, 'I/O error')")
    proc = subprocess.run([sys.executable, "-c", failing, str(ROOT / GENERATE), "--count", "5", "--length", "5",
                           "--seed", "3", "--output", str(out), "--workers", "1", "--clean"], capture_output=True,
                          text=True, env=dict(os.environ, SIGTERM_AT_RENAME="8"), cwd=ROOT, timeout=120)
    assert "the next run on this folder finishes the swap" in assert_one_line_error(proc, 1)
    assert len(list(out.glob(".generate-*/*.png"))) == 4 and (out / ".generate-swap").is_file()
    proc = run(GENERATE, "--count", 3, "--output", out, "--workers", 1)
    assert "its 5 captchas put in place" in proc.stderr
    new = {p.name for p in out.iterdir()}
    assert len(new) == 5 and not new & old


def test_generator_swap_it_cannot_finish(tmp, monkeypatch):
    """The next run finishing a swap where an old captcha cannot be removed (held open on Windows, read-only): one
    line, the mark kept for a run after (a PermissionError traceback)."""
    gen, out = load_script(GENERATE), tmp / "unfinished"
    assert run(GENERATE, "--count", 3, "--output", out, "--workers", 1).returncode == 0
    old = sorted(out.iterdir())
    (out / ".generate-5").mkdir()
    shutil.copy(old[0], out / ".generate-5" / "00000-new1.png")   # a captcha of ours, under a new name
    (out / ".generate-swap").write_text(".generate-5\n00000-new1.png\n")
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(
        errno.EPERM, "Operation not permitted", str(self))) if self in old else unlink(self, *a, **k))
    with pytest.raises(gen.UserError, match="the old ones cannot all go .*make the folder writable and run again"):
        gen.finish_swap(out, False)
    assert (out / ".generate-swap").exists() and (out / "00000-new1.png").exists()


@pytest.mark.parametrize("args", [["--count", "0"], ["--length", "0"], ["--fonts", "/nonexistent/fonts"],
                                  ["--workers", "100000"], ["--length", "4-"], ["--output", ""]])
def test_generator_bad_options(tmp, args):
    line = assert_one_line_error(run(GENERATE, "--output", tmp / "bad", *args), 2)
    assert line.startswith("error:")


def test_generator_length_and_extra_fonts(tmp):
    fonts = tmp / "fonts"
    fonts.mkdir()
    import matplotlib
    shutil.copy(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), fonts / "extra.ttf")
    (fonts / "broken.ttf").write_text("not a font")
    # a symbol font maps every character to a glyph, but not to its own: images that would not show their codes
    shutil.copy(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "cmsy10.ttf"), fonts / "symbols.ttf")
    out = tmp / "len6"
    proc = run(GENERATE, "--count", 10, "--length", 6, "--output", out, "--fonts", fonts)
    assert proc.returncode == 0, proc.stderr
    assert "broken.ttf" in proc.stderr and "symbols.ttf: it draws other glyphs" in proc.stderr
    assert "extra.ttf" not in proc.stderr
    assert all(re.fullmatch(r"\d{5}-\w{6}\.png", p.name) for p in out.iterdir())


def test_glyph_names_that_draw_other_characters():
    """generate.py --fonts: a glyph named for its character (with a variant suffix, a uniXXXX name, or a font's own
    numbering) draws it; a symbol's name, a capital for a small letter, a Zapf Dingbats number do not."""
    gen = load_script(GENERATE)
    for name, char in [("a", "a"), ("a.sc", "a"), ("K_", "K"), ("seven", "7"), ("seven.lf", "7"),
                       ("sevenoldstyle", "7"), ("uni0037", "7"), ("Glyph12", "K"), ("gid7", "b"), ("cid00012", "b"),
                       ("", "b")]:
        assert not gen.other_glyph(name, char), (name, char)
    for name, char in [("turnstileright", "a"), ("element", "2"), ("A.sc", "a"), ("a1", "b"), ("Eta", "H")]:
        assert gen.other_glyph(name, char), (name, char)



def test_generator_fonts_folder_it_cannot_read(tmp, monkeypatch):
    """--fonts naming a folder it may not list (simulated: root reads everything): one line, not a traceback."""
    gen = load_script(GENERATE)

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(gen.UserError, match="--fonts .*: cannot read this folder \\(Permission denied\\)"):
        gen.font_pool(tmp)


# ---- prepare ----
def test_prepare_counts_skips_and_meta(prepared):
    data, proc = prepared
    meta = json.loads((data / "meta.json").read_text())
    assert meta["kept"] == N_CAPTCHAS + 3 and meta["skipped"] == 5
    codes = [p.stem.split("-")[1].lower() for p in data.parent.joinpath("generated").iterdir()] + ["rgba", "g1f5", "gray"]
    assert meta["charset"] == "".join(sorted(set("".join(codes))))   # --charset auto: what the codes use
    assert meta["length"] == 4 and meta["lengths"] == [4] and meta["image_size"] == [40, 96]
    assert meta["counts"] == {"training_set": 363, "validating_set": 40, "testing_set": 0}   # 10%, no test < 2,000
    for reason in ("unreadable image", "code longer than 16 characters", "spaces or control characters",
                   "no code in the name", "not an image file"):
        assert reason in proc.stdout, (reason, proc.stdout)
    assert f"{N_CAPTCHAS + 3} images kept, 5 skipped" in proc.stdout


def test_file_names_that_are_not_utf8(tmp, generated):
    """A name in another encoding (a zip made on Windows): prepare quotes it escaped, eval and generate.py print it
    escaped, where a strict UTF-8 stdout (the usual locale; the tests' too) raised UnicodeEncodeError with a
    traceback."""
    folder = tmp / "not_utf8"
    folder.mkdir()
    for p in sorted(generated.iterdir())[:3]:
        shutil.copy(p, folder / p.name)
    shutil.copy(p, os.fsencode(folder) + b"/x-ab\xff.png")   # its code holds a byte that decodes to no character
    (folder / "dir-abcd.png").mkdir()                        # entries named like images that are no files: counted
    (folder / "gone-abcd.png").symlink_to(tmp / "nothing.png")
    proc = run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", tmp / "not_utf8_data", "--workers", 1)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "3 images kept, 3 skipped" in proc.stdout and "x-ab\\udcff.png" in proc.stdout
    assert "not a regular file (e.g. dir-abcd.png, gone-abcd.png)" in proc.stdout
    line = assert_one_line_error(run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", folder), 2)
    assert "is the image folder" in line   # its plots and models would come back as captchas
    odd = os.fsdecode(os.fsencode(tmp) + b"/generated\xff")   # generate.py names it escaped
    proc = run("generate-captcha/generate.py", "--count", 2, "--output", odd)
    assert proc.returncode == 0 and "generated\\udcff in" in proc.stdout, proc.stderr


def test_prepare_storage_is_uint8_chw_in_batches_of_1000(prepared):
    data, _ = prepared
    mod = load_script("captcha.py")
    x, y = mod.read_split(data, "training_set")
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, 40, 96)
    assert y.dtype == torch.long and y.shape == (len(x), 4)
    assert sorted(p.name for p in data.glob("*.pt.gz")) == [
        "testing_set.0.pt.gz", "training_set.0.pt.gz", "validating_set.0.pt.gz"]


def test_shards_hold_only_their_own_images(tmp):
    mod = load_script("captcha.py")
    folder = tmp / "shards"
    folder.mkdir()
    x, y = torch.randint(0, 256, (2500, 3, 8, 8), dtype=torch.uint8), torch.arange(2500 * 4).view(2500, 4)
    mod.write_split(folder, "training_set", (x, y))
    sizes = [(folder / f"training_set.{i}.pt.gz").stat().st_size for i in range(3)]
    assert sizes[2] < 0.6 * sizes[0]  # 500 images, not the whole split
    assert len(mod.load_shard(folder / "training_set.2.pt.gz")[0]) == 500
    back = mod.read_split(folder, "training_set")
    assert torch.equal(back[0], x) and torch.equal(back[1], y)
    mod.write_split(folder, "validating_set", (x[:0], y[:0]))  # an empty split reads back empty
    assert len(mod.read_split(folder, "validating_set")[0]) == 0


def test_prepare_split_is_deterministic(tmp, image_dir, prepared):
    data, _ = prepared
    mod = load_script("captcha.py")
    again, other = tmp / "again", tmp / "other"
    assert run("captcha.py", "prepare", "--image-dir", image_dir, "--data-dir", again, "--workers", 1).returncode == 0
    assert run("captcha.py", "prepare", "--image-dir", image_dir, "--data-dir", other, "--seed", 1).returncode == 0
    for name in ("training_set", "validating_set", "testing_set"):
        a, b = mod.read_split(data, name), mod.read_split(again, name)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(mod.read_split(data, "validating_set")[1], mod.read_split(other, "validating_set")[1])


def test_prepare_removes_stale_batches(tmp, image_dir):
    data = tmp / "stale"
    data.mkdir()
    (data / "training_set.7.pt.gz").write_bytes(b"stale")
    assert run("captcha.py", "prepare", "--image-dir", image_dir, "--data-dir", data).returncode == 0
    assert not (data / "training_set.7.pt.gz").exists()


def test_prepare_case_sensitive_and_custom_charset(tmp, generated):
    data = tmp / "case"
    proc = run("captcha.py", "prepare", "--image-dir", generated, "--data-dir", data, "--case-sensitive",
               "--charset", "A-Za-z0-9")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((data / "meta.json").read_text())
    assert meta["kept"] == N_CAPTCHAS and len(meta["charset"]) == 62
    digits = tmp / "digits"
    proc = run("captcha.py", "prepare", "--image-dir", generated, "--data-dir", digits, "--charset", "0-9")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((digits / "meta.json").read_text())
    assert meta["kept"] + meta["skipped"] == N_CAPTCHAS
    assert meta["kept"] == sum(all(c.isdigit() for c in p.name[6:10]) for p in generated.iterdir())


def test_parse_code_unit():
    mod = load_script("captcha.py")
    regex = re.compile(mod.LABEL_REGEX)
    lower = mod.resolve_charset("a-z0-9", False)
    assert mod.parse_code("00001-8cA6.png", regex, lower, 4, False) == ("8ca6", None)
    assert mod.parse_code("my-prefix-8cA6.jpg", regex, lower, 4, False) == ("8ca6", None)
    assert mod.parse_code("00001-8cA6.png", regex, lower, 4, True)[0] is None  # 'A' not in a-z0-9
    both = mod.resolve_charset("A-Za-z0-9", True)
    assert mod.parse_code("00001-8cA6.png", regex, both, 4, True) == ("8cA6", None)
    assert mod.parse_code("00001-8ca.png", regex, lower, 4, False)[0] is None
    assert mod.parse_code("2b827.png", regex, lower, None, False) == ("2b827", None)   # no prefix: the whole stem
    assert mod.parse_code("2B8_7.PNG", regex, None, None, True) == ("2B8_7", None)     # charset auto: any character
    assert mod.parse_code("a-.png", regex, None, None, False)[1] == "no code in the name"
    assert mod.parse_code("x" * 17 + ".png", regex, None, None, False)[1] == "code longer than 16 characters"
    assert mod.resolve_charset("auto", False) is None


def test_load_image_modes(tmp):
    mod = load_script("captcha.py")
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent -> white
    rgba.save(tmp / "t.png")
    img = mod.load_image(tmp / "t.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    Image.new("P", (20, 10)).save(tmp / "p.gif")
    t = mod.to_input(mod.load_image(tmp / "p.gif"), (40, 96))
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, 40, 96)


# ---- captchas as people have them: no prefix, label files, several lengths, other shapes ----
@pytest.fixture(scope="module")
def wide(tmp):
    """40 captchas of another style: 200x50, dark palette, 5 or 6 characters."""
    out = tmp / "wide"
    proc = run(GENERATE, "--count", 40, "--output", out, "--size", "200x50", "--palette", "dark", "--length", "5-6",
               "--seed", 5, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def no_prefix(tmp, wide):
    """The wide captchas named CODE.png, prepared with the defaults."""
    folder, data = tmp / "no_prefix", tmp / "no_prefix_data"
    folder.mkdir()
    for p in sorted(wide.iterdir()):
        shutil.copy(p, folder / f"{p.stem.split('-')[1]}.png")
    proc = run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", data, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    return folder, data, proc


def test_generator_length_range_size_and_palette(tmp, wide):
    codes = [p.stem.split("-")[1] for p in wide.iterdir()]
    assert {len(c) for c in codes} == {5, 6}
    assert {Image.open(p).size for p in wide.iterdir()} == {(200, 50)}
    pixels = Image.open(sorted(wide.iterdir())[0]).convert("L").tobytes()
    assert sum(pixels) / len(pixels) < 128            # a dark background
    out = tmp / "len3to5"
    assert run(GENERATE, "--count", 30, "--length", "3-5", "--output", out, "--workers", 1).returncode == 0
    assert {len(p.stem.split("-")[1]) for p in out.iterdir()} == {3, 4, 5}
    for bad in (["--length", "5-3"], ["--length", "17"], ["--size", "200"], ["--palette", "neon"]):
        assert assert_one_line_error(run(GENERATE, "--output", tmp / "bad", *bad), 2).startswith("error:")


def test_prepare_names_without_prefix_mixed_lengths_and_width(no_prefix):
    folder, data, proc = no_prefix
    meta = json.loads((data / "meta.json").read_text())
    codes = sorted(p.stem.lower() for p in folder.iterdir())
    assert meta["kept"] == 40 and meta["skipped"] == 0
    assert meta["lengths"] == [5, 6] and meta["length"] == 6
    assert meta["image_size"] == [40, 160]                 # 200x50 images keep their aspect ratio
    assert meta["counts"] == {"training_set": 36, "validating_set": 4, "testing_set": 0}
    assert "code length 5-6" in proc.stdout and "no test split" in proc.stdout
    mod = load_script("captcha.py")
    charset = meta["charset"]
    read = []
    for name in ("training_set", "validating_set"):
        x, y = mod.read_split(data, name)
        assert tuple(x.shape[1:]) == (3, 40, 160) and y.shape[1] == 6
        read += [mod.decode_code(row, charset) for row in y.tolist()]
        assert all(row[5] == len(charset) for row, code in zip(y.tolist(), read[-len(y):]) if len(code) == 5)
    assert sorted(read) == codes                          # every code back, the 5-character ones end-padded


def test_mixed_lengths_end_to_end(no_prefix):
    """Train on codes of 5 and 6 characters; eval emits codes of at most 6 characters from the charset only."""
    folder, data, _ = no_prefix
    proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 1, "--epoch-size", 0, "--batch-size", 12,
               "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "length 5-6" in proc.stdout
    assert "few labels (36): captchas in many fonts read far more from a model trained on generated captchas (--init" \
           " MODEL)" in proc.stdout
    proc = run("captcha.py", "eval", "--data-dir", data, "--json", folder)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    charset = json.loads((data / "meta.json").read_text())["charset"]
    assert len(rows) == 40
    assert all(len(r["code"]) <= 6 and set(r["code"]) <= set(charset) and 0 <= r["confidence"] <= 1 for r in rows)
    model = torch.load(data / "model.pt", weights_only=True)   # 6 positions, each a character or the end symbol
    assert model["length"] == 6 and model["model_args"]["n_classes"] == len(charset) + 1 == len(model["charset"]) + 1


def test_init_from_a_model_of_another_style(tmp, trained, no_prefix):
    """--init: the Hei-style model (40x96 input, 4 characters) starts a run on 200x50 captchas of 5-6 characters.
    The network's tensors are copied, the attention's that depend on length and size start fresh, the classifier's
    rows follow the characters; with --lr 1e-30 (0 is refused) the copied weights come out unchanged. --init with
    --resume is refused. The model may come from a copy of the script under another name (plates.py)."""
    src = trained[0] / "model.pt"
    data = tmp / "init"
    shutil.copytree(no_prefix[1], data, ignore=shutil.ignore_patterns("model.pt", "checkpoint.pt", "history.*"))
    renamed = torch.load(src, weights_only=True)
    torch.save({**renamed, "script": "plates"}, tmp / "plates_model.pt")   # was "trained by plates.py, not captcha.py"
    foreign = {k: v for k, v in renamed.items() if k != "charset"}   # no charset: not a captcha reader
    torch.save({**foreign, "script": "cifar_lenet"}, tmp / "foreign_model.pt")
    line = assert_one_line_error(run_main("captcha.py", "train", "--data-dir", data, "--init", tmp / "foreign_model.pt",
                                          "--device", "cpu"), 1)
    assert "model was trained by cifar_lenet.py, not captcha.py" in line
    proc = run("captcha.py", "train", "--data-dir", data, "--init", tmp / "plates_model.pt", "--epochs", 1,
               "--epoch-size", 0, "--batch-size", 12, "--lr", "1e-30", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"^initialised from .*model.pt: (\d+) of (\d+) tensors, (\d+) of (\d+) characters \(new: (.*)\)$",
                  proc.stdout, re.M)
    assert m and "few labels" not in proc.stdout, proc.stdout
    assert set(m.group(5).split(", ")) == {"positions", "prior", "queries"}   # length and input size differ
    old, new = (torch.load(p, weights_only=True) for p in (src, data / "model.pt"))
    assert int(m.group(1)) == len([k for k in new["model"] if k in old["model"]]) - 3
    assert int(m.group(3)) == len(set(new["charset"]) & set(old["charset"])) and int(m.group(4)) == len(new["charset"])
    for key in ("stem.0.weight", "layers.0.conv1.weight", "layers.5.conv2.weight"):
        assert torch.equal(old["model"][key], new["model"][key])
    # the classifier's rows follow the characters (and the end symbol, the last row)
    shared = [(i, old["charset"].index(c)) for i, c in enumerate(new["charset"]) if c in old["charset"]]
    for i, j in shared + [(len(new["charset"]), len(old["charset"]))]:
        assert torch.equal(new["model"]["classifier.1.weight"][i], old["model"]["classifier.1.weight"][j])
    old, new = old["model"], new["model"]
    assert old["queries"].shape[0] == 4 and new["queries"].shape[0] == 6
    line = assert_one_line_error(run("captcha.py", "train", "--data-dir", data, "--init", src, "--resume",
                                     "--device", "cpu"), 2)
    assert "--init and --resume" in line
    broken = torch.load(src, weights_only=True)   # a captcha model.pt whose network has other names
    broken["model"] = {k: v for k, v in broken["model"].items() if not k.startswith("classifier")}
    torch.save(broken, tmp / "broken_init.pt")
    line = assert_one_line_error(run("captcha.py", "train", "--data-dir", data, "--init", tmp / "broken_init.pt",
                                     "--device", "cpu"), 1)
    assert "not a captcha model this run can start from" in line
    old = torch.load(src, weights_only=True)   # a reader of before the end symbol (2026-11-28): one class fewer
    old["model"] = {k: v[:-1] if k.startswith("classifier.1.") else v for k, v in old["model"].items()}
    torch.save({**old, "model_args": {**old["model_args"], "n_classes": len(old["charset"])}}, tmp / "old_init.pt")
    for command in (["train", "--data-dir", data, "--init"], ["eval", "--json", "--model"]):   # was an IndexError
        line = assert_one_line_error(run_main("captcha.py", *command, tmp / "old_init.pt", "--device", "cpu"), 1)
        assert "a model of an older captcha.py (no end symbol: one length only); train it again" in line
    (tmp / "model.onnx").write_bytes(b"an export")   # said for what it is, in-process, before any work
    for init, words in [(tmp / "model.onnx", "an ONNX export"), (tmp / "gone.pt", "no such file"), (tmp, "not a file")]:
        line = assert_one_line_error(run_main("captcha.py", "train", "--data-dir", data, "--init", init, "--device",
                                              "cpu"), 1)
        assert f"--init {init}: {words}; --init needs a model.pt that train wrote" in line
    # a model with a NaN weight is refused as it loads; a network that computes NaN (here from a huge weight of the
    # --init model): train stops before it saves anything, and the model of the run before stays where it is
    broken = torch.load(src, weights_only=True)
    broken["model"]["stem.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(broken, tmp / "nan_init.pt")
    before = (data / "model.pt").read_bytes()
    line = assert_one_line_error(run_main("captcha.py", "train", "--data-dir", data, "--init", tmp / "nan_init.pt",
                                          "--epochs", 1, "--epoch-size", 0, "--device", "cpu"), 1)
    assert "its weights hold NaN or infinity" in line
    broken["model"]["stem.0.weight"][0, 0, 0, 0] = 3e38
    torch.save(broken, tmp / "nan_init.pt")
    line = assert_one_line_error(run("captcha.py", "train", "--data-dir", data, "--init", tmp / "nan_init.pt",
                                     "--epochs", 1, "--epoch-size", 0, "--device", "cpu"), 1)
    assert "epoch 1: training loss is nan" in line
    assert (data / "model.pt").read_bytes() == before and not (data / "previous").exists()


def test_prepare_says_what_it_did_not_read(tmp, wide):
    """Images in subfolders are counted, not read (and named when they are all there is); names that do not look
    like codes (img_001.png) are read but warned about; one skip reason for every code outside the charset, whose
    ranges (a-f) are expanded; the error when nothing is left names the most common reason."""
    folder = tmp / "layout"
    shutil.copytree(wide, folder / "train")
    line = assert_one_line_error(run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", tmp / "layout_d"), 1)
    assert "no images in the folder itself, 40 in its subfolders (e.g. train/" in line and "--image-dir" in line
    for p in sorted(wide.iterdir())[:12]:
        shutil.copy(p, folder / f"img_{p.stem.split('-')[1]}.png")
    proc = run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", tmp / "layout_d", "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp / "layout_d" / "meta.json").read_text())
    assert meta["kept"] == 12 and meta["skipped_by_reason"] == {
        "in a subfolder (pass the subfolder as --image-dir, or a --labels file naming them)": 40}
    assert "warning: every code begins with 'img_'" in proc.stderr and "warning: 12 codes hold '_'" in proc.stderr
    # --charset a-f0-9: the codes of other letters are skipped under one reason listing the letters
    codes = [p.stem.split("-")[1].lower() for p in sorted(wide.iterdir())]
    proc = run("captcha.py", "prepare", "--image-dir", folder / "train", "--data-dir", tmp / "layout_hex",
               "--charset", "a-f0-9", "--workers", 1)
    hex_codes = [c for c in codes if set(c) <= set("abcdef0123456789")]
    outside = "".join(sorted(set("".join(codes)) - set("abcdef0123456789")))
    if hex_codes:
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp / "layout_hex" / "meta.json").read_text())["kept"] == len(hex_codes)
    else:
        assert "most skipped: characters outside the charset: " + outside in proc.stderr
    skips = [line for line in proc.stdout.splitlines() if "characters outside the charset" in line]
    assert skips == [f"  skipped {40 - len(hex_codes)}: characters outside the charset: {outside[:40]}"
                     f"{'...' if len(outside) > 40 else ''} (e.g. " + skips[0].split("(e.g. ")[1]]
    for charset in ("z-a", "a-c-e", "0123456789-abc"):   # not ranges; a literal '-' goes first or last
        assert_one_line_error(run("captcha.py", "prepare", "--image-dir", folder, "--charset", charset), 2)
    line = assert_one_line_error(run("captcha.py", "prepare", "--image-dir", folder / "train", "--data-dir",
                                     tmp / "layout_3", "--length", 3), 1)
    assert "no usable captcha image (most skipped: code of length " in line and ", not 3)" in line
    # a name written on macOS holds é as e + a combining accent: the code and the charset both read é
    mod = load_script("captcha.py")
    charset = mod.resolve_charset("-a-fe\u0301", False)
    assert charset == "-abcdef\u00e9" and mod.check_code("Cafe\u0301", charset, None, False) == ("caf\u00e9", None)


def test_prepare_labels_files(tmp, wide):
    """--labels: CSV with a header or whitespace text; files outside the folder, missing, listed twice or not
    listed, and lines without a code are skipped and counted once each; the codes come from the file. Quoted fields,
    extra columns named by a header, tabs, and lines no file system takes (a NUL, a name too long, a symlink loop,
    a line of 5,000 characters) are read or skipped, never a traceback."""
    folder = tmp / "named"
    folder.mkdir()
    truth = {}
    for i, p in enumerate(sorted(wide.iterdir())):
        shutil.copy(p, folder / f"img{i:04d}.png")
        truth[f"img{i:04d}.png"] = p.stem.split("-")[1]
    shutil.copy(sorted(wide.iterdir())[0], tmp / "outside.png")
    listed = sorted(truth)[:30]
    lines = ["file,code"] + [f"{name},{truth[name]}" for name in listed]
    lines += ["../outside.png,abcde", "missing.png,abcde", f"{listed[0]},zzzzz", "img0031.png,", f"{tmp}/outside.png,abcde"]
    (tmp / "labels.csv").write_text("\n".join(lines) + "\n")
    data = tmp / "named_csv"
    proc = run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", data, "--labels", tmp / "labels.csv",
               "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((data / "meta.json").read_text())
    assert meta["kept"] == 30
    assert meta["skipped_by_reason"] == {"file outside --image-dir": 2, "listed file not found": 1,
                                         "file listed twice (first code kept)": 1,
                                         "line without a code": 1, "image not in the labels file": 9}
    mod = load_script("captcha.py")
    codes = [mod.decode_code(row, meta["charset"]) for name in ("training_set", "validating_set")
             for row in mod.read_split(data, name)[1].tolist()]
    assert sorted(codes) == sorted(truth[name].lower() for name in listed)
    # whitespace-separated text, no header, case kept
    (tmp / "labels.txt").write_text("".join(f"{name}  {truth[name]}\n" for name in listed[:12]))
    data = tmp / "named_txt"
    proc = run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", data, "--labels", tmp / "labels.txt",
               "--case-sensitive", "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((data / "meta.json").read_text())
    assert meta["kept"] == 12 and set(meta["charset"]) == set("".join(truth[name] for name in listed[:12]))
    # images in a subfolder, named there by the labels file (the folder itself holds no file)
    (tmp / "nested").mkdir()
    shutil.copytree(folder, tmp / "nested" / "sub")
    (tmp / "nested" / "link.png").symlink_to(tmp / "outside.png")   # named, but leads out: counted once
    (tmp / "sub.txt").write_text("".join(f"sub/{name} {truth[name]}\n" for name in listed[:12]) + "link.png abcde\n")
    proc = run("captcha.py", "prepare", "--image-dir", tmp / "nested", "--data-dir", tmp / "nested_data", "--labels",
               tmp / "sub.txt", "--workers", 1)
    meta = json.loads((tmp / "nested_data" / "meta.json").read_text())
    assert proc.returncode == 0 and meta["kept"] == 12 and meta["skipped_by_reason"] == {
        "a link leading out of --image-dir (links are followed inside it only)": 1}
    # a labels file that is not UTF-8, or missing: one line
    (tmp / "latin1.csv").write_bytes("file,code\nimg0000.png,caf\xe9\n".encode("latin-1"))
    line = assert_one_line_error(run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", tmp / "l1",
                                     "--labels", tmp / "latin1.csv"), 1)
    assert "UTF-8" in line and not (tmp / "l1" / "meta.json").exists()
    line = assert_one_line_error(run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", tmp / "l2",
                                     "--labels", tmp / "none.csv"), 1)
    assert "none.csv" in line
    # lines as people write them, read in-process: each bad line skipped and counted, never the end of prepare
    name = listed[0]
    (folder / "loop-a.png").symlink_to(folder / "loop-b.png")
    (folder / "loop-b.png").symlink_to(folder / "loop-a.png")
    (folder / "a dir.png").mkdir()
    for text, codes, reasons in [
            (f'file, code\n"{name}", "{truth[name]}"\n', {name: truth[name]}, {}),   # quoted, a space after commas
            (f"file,width,height,code\n{name},120,50,{truth[name]}\n", {name: truth[name]}, {}),   # column by name
            (f"file,code,source\n{name},{truth[name]},site\n", {name: truth[name]}, {}),
            (f",image,label\n0,{name},{truth[name]}\n", {name: truth[name]}, {}),   # pandas' index column first
            (f"missing.png,value\n{name},{truth[name]}\n", {name: truth[name]}, {"listed file not found": 1}),
            (f"id file code\n1 {name} {truth[name]}\n", {name: truth[name]}, {}),   # a header of three words
            (f"image_name,label\n{name},{truth[name]},\n", {name: truth[name]}, {}),   # a trailing comma
            (f"{name},{truth[name]},extra\n", {}, {"line of more than two fields": 1}),
            (f"{name}\t{truth[name]}\nmy img.png\tabc\n", {name: truth[name]}, {"listed file not found": 1}),
            (f"{name},{truth[name]}\nimg\x00.png,abc\n{'y' * 300}.png,abc\n", {name: truth[name]},
             {"unusable file name": 2}),
            (f"{name},{truth[name]}\n{'z' * 5000},abc\nloop-a.png,abc\na dir.png,abc\n", {name: truth[name]},
             {"line over 4096 characters": 1, "unusable file name": 1, "listed, not a regular file": 1}),
            (f"filename;label\n{name};{truth[name]}\n", {name: truth[name]}, {}),   # semicolons
            (f"# labels\n{name},{truth[name]}\n{listed[1]},{truth[listed[1]]}\n",   # a comment line
             {name: truth[name], listed[1]: truth[listed[1]]}, {}),
            (f"# labels\nfile,code\n{name},{truth[name]}\n", {name: truth[name]}, {}),   # a header after it
            (f"file;code;score\n{name};{truth[name]};0,93\n{listed[1]};{truth[listed[1]]};0,5\n",   # decimal commas
             {name: truth[name], listed[1]: truth[listed[1]]}, {}),
            (f"file code note\n{name} {truth[name]} a free text\n", {name: truth[name]}, {}),   # named columns
            (f"{name} {truth[name]} 1\n", {}, {"line of more than two fields": 1}),   # not "a code with spaces"
            (f",abc\n{name},\n", {}, {"line without a file name": 1, "line without a code": 1}),
            (f"{folder.name}/{name},{truth[name]}\n", {},   # a name from the folder above --image-dir
             {f"listed file not found: names are read inside --image-dir, and these begin with its own name "
              f"{folder.name!r}": 1})]:
        (tmp / "odd.csv").write_text(text)
        labels, skipped, _ = mod.read_labels(tmp / "odd.csv", folder)
        assert {p.name: code for p, code in labels.items()} == codes, (text, labels)
        if "loop-a.png" in skipped.get("listed file not found", []):   # a symlink loop: Python versions differ
            skipped["unusable file name"] = skipped.pop("listed file not found")
        assert {reason.split(" (")[0]: len(lines) for reason, lines in skipped.items()} == reasons, (text, skipped)
    (tmp / "odd.csv").write_text(f"file,width,height\n{name},120,50\n")
    with pytest.raises(mod.UserError, match="which column holds the code"):
        mod.read_labels(tmp / "odd.csv", folder)
    for args, words, status in [(["--labels", folder / "a dir.png"], "not a regular file", 1),
                                (["--labels", tmp / "odd.csv", "--label-regex", "(.*)"], "pass one of them", 2)]:
        line = assert_one_line_error(run_main("captcha.py", "prepare", "--image-dir", folder, "--data-dir",
                                              tmp / "l3", *args), status)
        assert words in line
    (tmp / "three.csv").write_text("".join(f"{n},{truth[n]}\n" for n in listed[:5]) + f"{listed[5]},abc,extra\n")
    proc = run_main("captcha.py", "prepare", "--image-dir", folder, "--data-dir", tmp / "l4", "--labels",
                    tmp / "three.csv", "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp / "l4" / "meta.json").read_text())["skipped_by_reason"] == {   # each file counted once
        "line of more than two fields (a header naming the code column says which)": 1,
        "image not in the labels file": len(truth) - 6}
    proc = run_main("captcha.py", "prepare", "--image-dir", folder, "--data-dir", tmp / "l5", "--labels",
                    tmp / "three.csv", "--split", "90/10/0", "--workers", 1)   # 5 images: 10% rounds to none
    assert proc.returncode == 0 and "train can score only the images it trains on" in proc.stdout, proc.stdout
    assert any("numbered" in doubt for doubt in mod.doubtful_codes([str(i) for i in range(1, 31)]))
    doubts = mod.doubtful_codes(["2b827", "8ca6e", "2b827(1)", "x7k2p.png"])   # a download's copies
    assert any("2 codes end like a copied or twice-named file" in doubt for doubt in doubts)
    assert not mod.doubtful_codes(["2841", "0317", "5520", "9012", "1177", "6304", "4450", "7788", "3001", "8265"])


def test_calibration_unit():
    """Platt scaling of the log raw confidence recovers a known relation, and among codes with a calibrated
    confidence of 0.9 or more about 90% or more are right; a set where every code is right still fits."""
    mod = load_script("captcha.py")
    gen = torch.Generator().manual_seed(0)
    scores = -torch.rand(4000, generator=gen) * 4
    right = torch.rand(4000, generator=gen) < torch.sigmoid(2.5 * scores + 4.0)
    fit = mod.fit_calibration(scores, right)
    assert fit["a"] == pytest.approx(2.5, rel=0.25) and fit["b"] == pytest.approx(4.0, rel=0.25)
    confident = mod.calibrated(scores, fit) >= 0.9
    assert confident.sum() > 100 and right[confident].float().mean() >= 0.88
    assert (mod.calibrated(scores, fit) <= scores.exp() + 0.5).all()
    # a validation split read all right (or with 1-2 wrong codes, or all wrong) has no slope to fit: the fit gave
    # every image, a blank one too, the same confidence; the raw confidence is kept, in its order
    for n_wrong in (0, 2, 48, 50):
        assert mod.fit_calibration(scores[:50], torch.arange(50) >= n_wrong) is None
    assert torch.equal(mod.calibrated(scores[:50], None), scores[:50].exp())
    lowest = torch.zeros(50, dtype=torch.bool)
    lowest[scores[:50].argsort()[:3]] = True   # 3 wrong codes, the least sure ones: fitted, finite, in order
    few = mod.fit_calibration(scores[:50], ~lowest)
    p = mod.calibrated(scores[:50], few)
    assert torch.isfinite(p).all() and (p < 1).all() and few["a"] > 0 and p[lowest].max() < p[~lowest].min()
    highest = torch.zeros(50, dtype=torch.bool)
    highest[scores[:50].argsort()[-5:]] = True   # the surest codes wrong: a slope under 0, no calibration
    assert mod.fit_calibration(scores[:50], ~highest) is None


def test_codes_read_all_right_calibrate_on_distorted_copies():
    """A validation split read all right leaves Platt scaling no slope; its images read again under the training
    distortions (CALIBRATION_READS reads in all) give one: a reader that is less sure, then wrong, the more an image
    is distorted gets a calibration that ranks as its raw confidence does."""
    mod = load_script("captcha.py")

    class Stand(torch.nn.Module):   # reads "a" on a white image; the further from white, the less sure, then wrong
        def forward(self, x):
            out = torch.zeros(len(x), 2, 3)
            out[:, 0, 0] = 4 - 60 * (1 - x.float()).abs().mean((1, 2, 3))
            out[:, 1, 2] = 9   # then the end symbol
            return out

    cpu = torch.device("cpu")
    x, y = torch.full((10, 3, 40, 96), 255, dtype=torch.uint8), torch.tensor([[0, 2]] * 10)
    pred, scores = mod.read_codes(Stand(), x, cpu, 64, None, mod.VIEWS)
    right = (pred == y).all(1)
    assert right.all() and mod.fit_calibration(scores, right) is None
    more_scores, more_right = mod.distorted_reads(Stand(), x, y, cpu, 64, None)
    assert len(more_right) == 1990 and 10 < (~more_right).sum() < 1980   # 199 copies of 10 images, some read wrong
    fit, own_scores, own_right, said = mod.fit_confidence(Stand(), x, y, cpu, 64, None)   # what train does
    assert torch.equal(own_scores, scores) and own_right.all() and fit["a"] > 0
    assert re.fullmatch(r"10 codes and 1990 distorted copies of them \(\d+ read wrong; .*\)", said), said
    assert fit == mod.fit_calibration(torch.cat([scores, more_scores]), torch.cat([right, more_right]))
    assert mod.calibrated(scores, fit).min() > mod.calibrated(more_scores[~more_right], fit).mean()
    again, _ = mod.distorted_reads(Stand(), x, y, cpu, 64, None)
    assert torch.equal(again, more_scores)   # the same distortions every time: a run's calibration is repeatable
    # 3 wrong codes or more: on a split of under 100 codes the distorted reads still join, from 100 on not
    four_wrong = torch.cat([torch.tensor([[1, 2]] * 4), y[4:]])   # 4 of the 10 codes are "b": read wrong
    fit, _, own_right, said = mod.fit_confidence(Stand(), x, four_wrong, cpu, 64, None)
    assert own_right.sum() == 6 and fit["a"] > 0
    assert re.fullmatch(r"10 codes and 1990 distorted copies of them \(\d+ read wrong; the codes alone: too few, "
                        r"under 100\)", said), said
    x100, y100 = torch.full((100, 3, 40, 96), 255, dtype=torch.uint8), torch.tensor([[0, 2]] * 96 + [[1, 2]] * 4)
    fit, scores100, _, said = mod.fit_confidence(Stand(), x100, y100, cpu, 64, None)
    assert said == "100 codes" and fit == mod.fit_calibration(scores100, (y100 == torch.tensor([0, 2])).all(1))
    # under 3 right codes (a tiny or untrained split): no distorted reads, the raw confidence
    y[2:] = torch.tensor([1, 2])   # 8 of the 10 codes are "b": read wrong
    fit, _, own_right, said = mod.fit_confidence(Stand(), x, y, cpu, 64, None)
    assert fit is None and own_right.sum() == 2 and said == "10 codes"


def test_train_figures_read_codes_as_eval_does():
    """train's exact-match and per-character figures (read_codes, run_epoch) count a code right when eval prints it
    right: a class after the first end symbol is not read (it made a right code wrong)."""
    mod = load_script("captcha.py")
    end = 3   # charset "abc", then the end symbol
    logits = torch.full((2, 4, 4), -9.0)
    for row, classes in enumerate([(0, end, 1, end), (0, 1, 2, end)]):   # "a" then a stray "b"; "abc"
        logits[row, torch.arange(4), torch.tensor(classes)] = 9.0

    class Stand(torch.nn.Module):   # a network that reads these two images so, in any view
        def forward(self, x):
            return logits.repeat(len(x) // 2, 1, 1)

    pred, _ = mod.read_codes(Stand(), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.device("cpu"), 2, None)
    truth = torch.tensor([[0, end, end, end], [0, 1, 2, end]])
    assert [mod.decode_code(p.tolist(), "abc") for p in pred] == ["a", "abc"]
    assert (pred == truth).all(1).tolist() == [True, True]


def test_prepare_option_errors(tmp, capsys):
    """Out-of-range options stop in the parser, before any work (in-process: no torch start per case)."""
    mod = load_script("captcha.py")
    parser = mod.build_parser()
    for args in (["--length", "0"], ["--length", "17"], ["--split", "80/30/10"], ["--split", "0/50/50"],
                 ["--image-size", "8", "96"], ["--image-size", "40"], ["--split", "a/b/c"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["prepare", *args])
        assert exit_.value.code == 2 and "error:" in capsys.readouterr().err, args
    ok = parser.parse_args(["prepare", "--length", "5", "--split", "90/10/0", "--image-size", "48", "160"])
    assert (ok.length, ok.split, ok.image_size) == (5, (90, 10, 0), (48, 160))
    assert mod.split_sizes(1000, "auto") == (900, 100, 0) and mod.split_sizes(20000, "auto") == (18000, 1000, 1000)
    assert mod.split_sizes(1000, (90, 10, 0)) == (900, 100, 0) and mod.split_sizes(1, "auto") == (1, 0, 0)
    assert parser.parse_args(["train"]).augment == "auto" and parser.parse_args(["train", "--augment", "0"]).augment == 0
    strengths = [mod.auto_augment(n) for n in (1, 225, 300, 449, 450, 500, 1000, 2000, 10000, 18000, 100000)]
    assert strengths[:2] == [1.5, 1.5] and 1 < strengths[2] < 1.5 and strengths[4:7] == [1, 1, 1], strengths
    assert strengths == sorted(strengths, reverse=True) and 0.1 <= strengths[9] <= 0.12 and strengths[10] < 0.05
    longer = [mod.auto_augment(18000, passes) for passes in (2, 5, 24, 60, 10000)]   # each image seen this often
    assert longer == sorted(longer) and longer[1] == strengths[9] and 0.27 <= longer[2] <= 0.31 and longer[4] == 1
    assert mod.auto_augment(900, 300) == 1


# ---- train ----
def test_train_writes_model_history_and_scores(trained):
    data, proc = trained
    assert re.search(r"epoch 1/2 .*train loss .*val loss .*acc .*img/s", proc.stdout)
    assert re.search(r"no test split: validation exact-match \d+\.\d+%", proc.stdout)
    for name in ("model.pt", "checkpoint.pt", "history.csv", "history.png"):
        assert (data / name).exists(), name
    assert not list(data.glob("*.tmp*"))
    rows = list(csv.DictReader((data / "history.csv").open()))
    assert len(rows) == 2 and list(rows[0])[:5] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert "train 363 (600 per epoch)" in proc.stdout and rows[0]["steps"] == "5"   # a small set repeats to 600
    assert "augment 1.138 (from epoch 1), " in proc.stdout   # --augment auto: over full strength under 450 images
    model = torch.load(data / "model.pt", weights_only=True)
    meta = json.loads((data / "meta.json").read_text())
    assert model["script"] == "captcha" and model["charset"] == meta["charset"]
    assert model["length"] == 4 and list(model["image_size"]) == [40, 96]
    assert model["model_args"]["n_classes"] == len(meta["charset"]) + 1          # the end symbol
    right = round(float(re.search(r"validation read in 5 views as eval does: exact-match (\d+\.\d+)%; ",
                                  proc.stdout)[1]) * 40 / 100)   # of 40 validation codes, after 2 short epochs
    if right < 3:   # nothing to fit a slope on: the raw confidence, said
        assert model["calibration"] is None and "; confidence not calibrated (under 3 wrong or right" in proc.stdout
    elif 40 - right < 3:   # (nearly) all right: fitted on distorted copies too, or said
        assert re.search(r"; confidence (calibrated on 40 codes and 1960 distorted copies|not calibrated)", proc.stdout)
    else:
        assert set(model["calibration"]) == {"a", "b"} and model["calibration"]["a"] > 0
        assert "; confidence calibrated on 40 codes" in proc.stdout
    assert model["views"] == [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]]   # eval reads in the views calibrated on


def test_shifted_views_unit():
    """Each view is the image moved by (dx, dy) whole pixels, the uncovered edge white; read_logp averages the
    network's log-probabilities over the views and keeps one row per image."""
    mod = load_script("captcha.py")
    x = torch.full((2, 3, 6, 8), 255, dtype=torch.uint8)
    x[0, :, 2, 3] = 0                                      # one black pixel in the first image
    views = mod.shifted_views(mod.preprocess(x), ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (2, -2)))
    assert views.shape == (12, 3, 6, 8)
    black = [v[0].nonzero().tolist() for v in views[::2] < 0]
    assert black == [[[2, 3]], [[2, 4]], [[2, 2]], [[3, 3]], [[1, 3]], [[0, 5]]], black
    assert (views[1::2] == 1).all()                        # the white image stays white: the edges fill white
    seen = []
    net = lambda batch: seen.append(len(batch)) or batch.mean((1, 2))[:, None, :].repeat(1, 4, 1)   # B,4,8
    logp = mod.read_logp(net, x, mod.VIEWS)
    assert seen == [10] and logp.shape == (2, 4, 8)
    expected = net(mod.shifted_views(mod.preprocess(x), mod.VIEWS)).log_softmax(-1).unflatten(0, (5, 2)).mean(0)
    assert torch.allclose(logp, expected)


def test_network_learns():
    """The model, loss, augmentation and optimizer together learn to read drawn digits of 2 to 4 characters
    (> 80% exact): the end symbol (class 10) pads the shorter codes and ends them in decode_code; predict (eval's
    and serve's answers) reads them from the pictures."""
    mod = load_script("captcha.py")
    torch.manual_seed(0)
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=30)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (64, 4), generator=gen)
    y[torch.arange(64) % 3 == 1, 3:] = 10     # a third of the codes 3 digits long, a third 2
    y[torch.arange(64) % 3 == 2, 2:] = 10
    images, pictures = [], []
    for code in y.tolist():
        img = Image.new("RGB", (96, 40), "white")
        for i, c in enumerate(code):
            if c < 10:
                ImageDraw.Draw(img).text((4 + 23 * i, 4), str(c), font=font, fill="black")
        images.append(mod.image_to_tensor(img))
        pictures.append(img)
    x = torch.stack(images)
    model = mod.build_model({"n_classes": 11, "length": 4, "image_size": [40, 96]})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cpu, scaler = torch.device("cpu"), torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(45):
        batches = list(torch.randperm(64, generator=gen).split(16))
        mod.run_epoch(model, x, y, cpu, batches, None, optimizer, scheduler, scaler, gen, strength=0.5)
    loss, exact, chars, n = mod.run_epoch(model, x, y, cpu, mod.in_order(64, 64, cpu), None)
    assert n == 64
    assert chars > 0.9 and exact > 0.8, (loss, exact, chars)
    truth = [mod.decode_code(t, "0123456789") for t in y.tolist()]
    for views in ((0, 0),), mod.VIEWS:                     # as validation reads, and as eval reads
        pred, scores = mod.read_codes(model, x, cpu, 64, None, views)
        codes = [mod.decode_code(p, "0123456789") for p in pred.tolist()]
        assert sorted(set(map(len, truth))) == [2, 3, 4] and sum(c == t for c, t in zip(codes, truth)) / 64 > 0.8
    assert (scores <= 0).all()
    answers = mod.predict(model, {"image_size": [40, 96], "charset": "0123456789", "views": mod.VIEWS}, cpu, None,
                          pictures)   # what eval, serve and the .onnx answer: the codes themselves
    assert sum(a["code"] == t for a, t in zip(answers, truth)) / 64 > 0.8, answers[:5]
    saved_before_the_prior = {k: v for k, v in model.state_dict().items() if k != "prior"}
    older = mod.build_model({"n_classes": 11, "length": 4, "image_size": [40, 96]})
    older.load_state_dict(saved_before_the_prior)   # reads with a flat prior
    assert not older.prior.any()


def test_resume_after_interrupt(tmp, trained, image_dir):
    """A fresh run moves the run before aside (nothing lost); Ctrl-C after the first epoch leaves whole files;
    --resume finishes the schedule."""
    src, _ = trained
    data = tmp / "resume"
    shutil.copytree(src, data, ignore=shutil.ignore_patterns("previous", "grid", "runs.csv", "model.onnx"))
    (data / "model.onnx").write_bytes(b"the export of the model before")
    (data / "runs.csv").write_text(f"tag,run_dir\nbefore,{data}\nelsewhere,{tmp}\n")
    before = {name: (data / name).read_bytes() for name in ("model.pt", "model.onnx", "checkpoint.pt", "history.csv")}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "captcha.py"), "train", "--data-dir", str(data),
                             "--epochs", "30", "--epoch-size", "0", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background
    # job's children start with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    for line in proc.stdout:  # 30 epochs: the run is still going when the signal lands
        if line.startswith("epoch 1/30"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not list(data.glob("*.tmp*"))
    kept = list((data / "previous").iterdir())
    assert len(kept) == 1 and {p.name: p.read_bytes() for p in kept[0].glob("*.*")} == {
        **before, "history.png": (src / "history.png").read_bytes()}
    ckpt = torch.load(data / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] in (1, 2)
    done = ckpt["epoch"]
    # the distortions rise over the first quarter of the 30 epochs (8), here to 1.138, the strength for 363 images
    assert [row["augment"] for row in csv.DictReader((data / "history.csv").open())][:2] == ["0.1422", "0.2845"][:done]
    # a shorter --epochs on resume: the rest of the schedule shrinks to fit
    proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 3, "--epoch-size", 0, "--device", "cpu",
               "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {data / 'checkpoint.pt'} after epoch {done}" in proc.stdout
    assert "epoch 3/3" in proc.stdout and f"epoch {done}/3" not in proc.stdout
    assert len((data / "history.csv").read_text().splitlines()) == 4
    (data / "model.onnx").write_bytes(b"exported after epoch 3")   # model.pt is written again (calibrated, at least)
    proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 4, "--epoch-size", 0, "--device", "cpu",
               "--resume")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^epoch (\d+)/4", proc.stdout, re.M) == ["4"]
    assert len((data / "history.csv").read_text().splitlines()) == 5
    assert not (data / "model.onnx").exists() and "model.onnx: moved to" in proc.stdout   # never beside another model
    assert sorted(p.read_bytes() for p in (data / "previous").glob("*/model.onnx")) == [
        b"exported after epoch 3", before["model.onnx"]]
    assert len(list((data / "previous").iterdir())) == 2   # a resumed run keeps its own files; the export aside
    # runs.csv: the row of the run before follows its files; the interrupted run wrote none, each resume one
    assert [(r["tag"], r["run_dir"]) for r in csv.DictReader((data / "runs.csv").open())] == [
        ("before", str(kept[0])), ("elsewhere", str(tmp)), ("", str(data)), ("", str(data))]
    # prepared again with the same characters in another order: each output of the network would stand for another
    # character, so the checkpoint is refused (it was accepted: same number of classes)
    charset = json.loads((data / "meta.json").read_text())["charset"]
    proc = run("captcha.py", "prepare", "--image-dir", image_dir, "--data-dir", data, "--charset", charset[::-1])
    assert proc.returncode == 0, proc.stderr
    resume = ["train", "--data-dir", data, "--epochs", 5, "--epoch-size", 0, "--device", "cpu", "--resume"]
    line = assert_one_line_error(run("captcha.py", *resume), 1)
    assert "trained on data prepared before the last prepare" in line and "train without --resume" in line
    meta = json.loads((data / "meta.json").read_text())   # data prepared before ids: the classes are compared
    (data / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "prepared"}))
    line = assert_one_line_error(run("captcha.py", *resume), 1)
    assert "trained on data of other classes" in line and "train without --resume" in line


def test_early_stopping_counts_patience_epochs(tmp, generated):
    data = tmp / "patience"   # 120 validation codes: enough to rank epochs (RANK_MIN)
    assert run_main("captcha.py", "prepare", "--image-dir", generated, "--data-dir", data, "--split", "70/30/0",
                    "--workers", 1).returncode == 0
    proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 6, "--patience", 1, "--lr", 1e-9,
               "--epoch-size", 0, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    epochs = re.findall(r"^epoch (\d+)/6", proc.stdout, re.M)
    history = (data / "history.csv").read_text().splitlines()[1:]
    rows = [list(map(float, row.split(",")[3:5])) for row in history]   # val_loss, val_acc
    # the model kept: the first epoch of the highest exact-match, here 0% (nothing learns at lr 1e-9; the loss
    # breaks ties only once some code is read)
    best = torch.load(data / "model.pt", weights_only=True)["epoch"]
    top = max(acc for _, acc in rows)
    assert top == 0 and best == 1
    assert len(epochs) == best + 1  # one epoch without improvement, then stop
    assert "early stop" in proc.stdout


def test_small_validation_split_keeps_the_last_epoch(tmp, generated):
    """Under RANK_MIN validation codes no epoch is chosen by them: the whole schedule runs (no early stop) and the
    last epoch's model is kept and quoted as the estimate. At lr 1e-9 nothing is read, so the rule for larger splits
    keeps epoch 1 and stops after epoch 2 (test_early_stopping_counts_patience_epochs)."""
    few = tmp / "twenty-for-ranking"
    few.mkdir()
    for path in sorted(generated.iterdir())[:20]:
        shutil.copy(path, few / path.name)
    data = tmp / "rank"
    assert run_main("captcha.py", "prepare", "--image-dir", few, "--data-dir", data, "--split", "50/50/0",
                    "--workers", 1).returncode == 0
    small = ["--lr", 1e-9, "--epoch-size", 0, "--batch-size", 10, "--device", "cpu"]
    proc = run_main("captcha.py", "train", "--data-dir", data, "--epochs", 3, *small)
    assert proc.returncode == 0, proc.stderr
    assert "10 validation codes: too few to rank epochs (under 50)" in proc.stdout
    assert re.findall(r"^epoch (\d+)/3", proc.stdout, re.M) == ["1", "2", "3"] and "early stop" not in proc.stdout
    assert torch.load(data / "model.pt", weights_only=True)["epoch"] == 3
    assert "(the last epoch's model) is the estimate" in proc.stdout and "optimistic" not in proc.stdout
    # a checkpoint that had stopped early (as the rule before this one could) goes on with the schedule
    checkpoint = torch.load(data / "checkpoint.pt", weights_only=True)
    torch.save({**checkpoint, "bad_epochs": 5}, data / "checkpoint.pt")
    proc = run_main("captcha.py", "train", "--data-dir", data, "--epochs", 4, *small, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^epoch (\d+)/4", proc.stdout, re.M) == ["4"] and "early stop" not in proc.stdout
    assert torch.load(data / "model.pt", weights_only=True)["epoch"] == 4
    # --patience given: the user's choice, the small split ranks the epochs (epoch 1 kept, a stop after epoch 2)
    proc = run_main("captcha.py", "train", "--data-dir", data, "--epochs", 3, "--patience", 1, *small)
    assert proc.returncode == 0, proc.stderr
    assert "10 validation codes rank the epochs (--patience given)" in proc.stdout and "too few" not in proc.stdout
    assert re.findall(r"^epoch (\d+)/3", proc.stdout, re.M) == ["1", "2"] and "early stop" in proc.stdout
    assert torch.load(data / "model.pt", weights_only=True)["epoch"] == 1
    # a resumed run ranks as it started, its --patience not given again (it kept each last epoch once)
    assert run_main("captcha.py", "train", "--data-dir", data, "--epochs", 2, "--patience", 5, *small).returncode == 0
    proc = run_main("captcha.py", "train", "--data-dir", data, "--epochs", 3, *small, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "10 validation codes rank the epochs" in proc.stdout and "too few" not in proc.stdout
    assert re.findall(r"^epoch (\d+)/3", proc.stdout, re.M) == ["3"]
    assert torch.load(data / "model.pt", weights_only=True)["epoch"] == 1
    # no validation split (the training images stand in) ranks nothing either; a test split names the model
    assert run_main("captcha.py", "prepare", "--image-dir", few, "--data-dir", tmp / "rank-test", "--split", "50/0/50",
                    "--workers", 1).returncode == 0
    proc = run_main("captcha.py", "train", "--data-dir", tmp / "rank-test", "--epochs", 2, "--patience", 1, "--lr",
                    1e-9, "--epoch-size", 0, "--batch-size", 10, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "no validation split; the whole schedule runs and the last epoch's model is kept" in proc.stdout
    assert "test (10 images, the last epoch's model, epoch 2, read as eval does)" in proc.stdout


def test_best_model_rule_unit():
    """Exact-match decides; the loss breaks a tie once some validation code is read."""
    improves = load_script("captcha.py").improves
    assert improves(0.6, 0.9, 0.5, 0.1) and not improves(0.5, 0.1, 0.6, 0.9)
    assert improves(0.98, 0.05, 0.98, 0.1) and not improves(0.98, 0.1, 0.98, 0.1)   # a tie: the lower loss
    assert not improves(0.0, 0.05, 0.0, 0.1)            # nothing read yet: the earlier model stays
    assert improves(1.0, 0.09, 1.0, 0.1) and not improves(1.0, 0.11, 1.0, 0.1)
    assert improves(1.0, 3.0, -1.0, float("inf"))           # the first epoch always counts


# ---- eval ----
def eval_json(trained, *args, stdin=None):
    data, _ = trained
    proc = run("captcha.py", "eval", "--data-dir", data, "--json", *args, stdin=stdin)
    return proc, [json.loads(line) for line in proc.stdout.splitlines()]


def test_eval_argument_human_output(trained, generated):
    data, _ = trained
    image = sorted(generated.iterdir())[0]
    proc = run("captcha.py", "eval", "--data-dir", data, image)
    assert proc.returncode == 0, proc.stderr
    match = re.fullmatch(rf"{re.escape(str(image))}  code: ([0-9a-z]{{0,4}})  confidence \d\.\d\d "
                         r"\(per position((?: \d\.\d\d)*)\)", proc.stdout.strip())
    assert match and len(match[2].split()) == len(match[1]), proc.stdout


def test_eval_folder_json(trained, generated):
    proc, rows = eval_json(trained, generated)
    assert proc.returncode == 0, proc.stderr
    assert [r["image"] for r in rows] == [str(p) for p in sorted(generated.iterdir())]
    for r in rows:
        assert set(r) == {"image", "code", "confidence"}
        assert re.fullmatch(r"[0-9a-z]{0,4}", r["code"]) and 0 <= r["confidence"] <= 1


def test_eval_stdin_and_bad_image(trained, generated, image_dir, tmp_path):
    """Paths from stdin: a bad or missing image is an error object, a folder stands for its images (it was called
    a folder with no images), an empty one is an error object; no path at all is an error."""
    good = [str(p) for p in sorted(generated.iterdir())[:3]]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").symlink_to(good[2])
    (tmp_path / "none").mkdir()
    stdin = "\n".join([good[0], str(image_dir / "90003-abcd.png"), "/nonexistent.png", "", good[1],
                       str(tmp_path / "one"), str(tmp_path / "none")]) + "\n"
    proc, rows = eval_json(trained, stdin=stdin)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [r["image"] for r in rows] == [good[0], str(image_dir / "90003-abcd.png"), "/nonexistent.png", good[1],
                                          str(tmp_path / "one" / "a.png"), str(tmp_path / "none")]
    assert "code" in rows[0] and "code" in rows[3] and "code" in rows[4]
    assert rows[1]["error"].startswith("cannot read image") and rows[2]["error"].startswith("cannot read image")
    assert "a folder with no images" in rows[5]["error"]
    proc, rows = eval_json(trained, stdin="\ufeff" + "\r\n".join(good[:2]) + "\r\n")   # a list saved on Windows
    assert proc.returncode == 0 and [r["image"] for r in rows] == good[:2], proc.stderr   # was "\ufeff...": no file
    proc, rows = eval_json(trained, stdin="\n  \n")   # `eval < /dev/null` was a silent success
    assert "no image path on stdin" in assert_one_line_error(proc, 1) and not rows


def test_eval_reads_modes_and_formats(trained, image_dir):
    proc, rows = eval_json(trained, image_dir / "90000-rgba.png", image_dir / "90001-g1f5.png",
                           image_dir / "90002-gray.jpg")
    assert proc.returncode == 0 and len(rows) == 3 and all("code" in r for r in rows)


def test_serve_ends_on_sigterm(trained):
    """A `kill` ends serve as Ctrl-C does: one line, status 143 (SIGTERM is no KeyboardInterrupt, which uvicorn
    takes as its own: serve ended in status 0), within seconds even while a client trickles an upload (it waited
    for the upload for ever). Each connection holds a file descriptor: serve raises its soft limit to the hard one.
    train under SIGTERM: test_hostile's lock test."""
    with serving("captcha.py", "--data-dir", trained[0], "--device", "cpu", open_files=256) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n01")
        limits = [line.split() for line in open(f"/proc/{proc.pid}/limits").read().splitlines()
                  if line.startswith("Max open files")]
        assert limits and limits[0][3] == limits[0][4] != "256", limits   # soft raised to hard
        time.sleep(0.5)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        upload.close()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err, err
    assert time.time() - start < 20


def test_serve_ctrl_c_twice(trained):
    """A second Ctrl-C while an upload holds the graceful stop ends serve at once, without the traceback starlette
    wrote for the lifespan it cancels."""
    with serving("captcha.py", "--data-dir", trained[0], "--device", "cpu") as (url, proc):
        upload = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        upload.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                       b"Content-Length: 1000\r\n\r\n01")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        second = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        upload.close()
    assert proc.returncode == 0 and "Traceback" not in err and "Error" not in err, err
    assert time.time() - second < 3   # at once: not after the graceful stop's limit (SERVE_LIMITS), which a lone
    # Ctrl-C waits for while the upload hangs


def test_serve_bounds_the_memory_of_decoded_images():
    """PixelBudget: a request waits for room before it decodes (at most `limit` pixels of images at once, one image
    alone always gets room); load_image reads only IMAGE_FORMATS (a TIFF is refused; an EPS would go through Ghostscript)."""
    mod = load_script("captcha.py")
    budget, log = mod.PixelBudget(100), []

    async def request(name, pixels, seconds):
        async with budget.room(pixels):
            log.append(f"{name} in")
            await asyncio.sleep(seconds)
            log.append(f"{name} out")

    async def scenario():
        await asyncio.gather(request("a", 80, 0.2), request("b", 50, 0), request("c", 500, 0), request("d", 20, 0))

    asyncio.run(scenario())   # in order of arrival: d (room beside a) waits behind b; c (500 > 100) enters alone
    assert log == ["a in", "a out", "b in", "b out", "c in", "c out", "d in", "d out"] and budget.used == 0
    budget, log = mod.PixelBudget(100), []

    async def cancelled():   # a request cancelled while it waits lets the next one in
        first = asyncio.create_task(request("a", 80, 0.2))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(request("b", 50, 0))
        behind = asyncio.create_task(request("c", 10, 0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(first, behind, return_exceptions=True)

    asyncio.run(cancelled())
    assert log == ["a in", "c in", "c out", "a out"] and budget.used == 0 and not budget.waiting
    eps = io.BytesIO()
    Image.new("RGB", (20, 10)).save(eps, format="TIFF")
    with pytest.raises(mod.UserError, match="not of a format read here"):
        mod.load_image(eps.getvalue())
    assert mod.pixel_count(eps.getvalue()) == 0
    png = io.BytesIO()
    Image.new("RGB", (20, 10)).save(png, format="PNG")
    assert mod.pixel_count(png.getvalue()) == 200 and mod.load_image(png.getvalue()).size == (20, 10)


def test_eval_interactive_prompt_until_eof(trained, generated):
    data, _ = trained
    image = sorted(generated.iterdir())[0]
    pid, fd = pty.fork()
    if pid == 0:  # child: the eval loop on a terminal
        os.execv(sys.executable, [sys.executable, str(ROOT / "captcha.py"), "eval", "--data-dir", str(data)])
    output = b""

    def read_until(marker, count, timeout=60):
        nonlocal output
        end = time.time() + timeout
        while output.count(marker) < count and time.time() < end:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break

    read_until(b"Image path: ", 1)
    os.write(fd, f"{image}\n".encode())
    read_until(b"Image path: ", 2)
    os.write(fd, b"\n")          # an empty line prompts again
    read_until(b"Image path: ", 3)
    os.write(fd, b"\x04")        # Ctrl-D: end of file
    read_until(b"\x00", 1, timeout=30)
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.WEXITSTATUS(status) == 0, text
    assert re.search(r"code: [0-9a-z]{0,4}  confidence", text), text
    assert text.count("Image path: ") == 3 and "error" not in text


# ---- bad input ----
def test_prepare_missing_and_empty_folder(tmp):
    """Each says what to do (SUITE.md: the line names the file or option and says what to do)."""
    line = assert_one_line_error(run_main("captcha.py", "prepare", "--image-dir", tmp / "missing",
                                     "--data-dir", tmp / "d1"), 1)
    assert "missing: no such image folder" in line and "pass --image-dir" in line
    (tmp / "empty").mkdir()
    line = assert_one_line_error(run_main("captcha.py", "prepare", "--image-dir", tmp / "empty",
                                     "--data-dir", tmp / "d2"), 1)
    assert "the folder is empty; put the captchas there or pass --image-dir" in line
    line = assert_one_line_error(run_main("captcha.py", "prepare", "--image-dir", tmp / "empty", "--labels",
                                          tmp / "no-labels.csv", "--data-dir", tmp / "d2"), 1)
    assert "no-labels.csv: no such file; pass the file that lists each image's code" in line
    for given, words in [(["--image-dir", tmp / "missing"], "no such folder; pass the folder of the images"),
                         (["--image-dir", tmp / "empty", "--labels", tmp / "no-labels.txt"],
                          "no such file; pass the file of one label per line")]:   # and CIFAR's
        assert words in assert_one_line_error(run_main("cifar_lenet.py", "prepare", *given, "--data-dir", tmp / "d3"), 1)


def test_prepare_split_leaving_no_training_image(tmp, generated):
    few = tmp / "twenty"
    few.mkdir()
    for path in sorted(generated.iterdir())[:20]:
        shutil.copy(path, few / path.name)
    line = assert_one_line_error(run_main("captcha.py", "prepare", "--image-dir", few, "--data-dir", tmp / "d0",
                                          "--split", "1/1/98", "--workers", 1), 2)   # 0 / 0 / 20 images
    assert "--split" in line and "no image left for training" in line
    assert not list((tmp / "d0").glob("*.pt.gz"))
    # 100/0/0: trained and validated on the same 20 images, and said so (it was "the estimate, slightly optimistic")
    assert run_main("captcha.py", "prepare", "--image-dir", few, "--data-dir", tmp / "d100", "--split", "100/0/0",
                    "--workers", 1).returncode == 0
    proc = run_main("captcha.py", "train", "--data-dir", tmp / "d100", "--epochs", 1, "--epoch-size", 0,
                    "--batch-size", 10, "--device", "cpu")
    assert proc.returncode == 0 and "validating on the training split" in proc.stderr, proc.stderr
    assert "no validation or test split: exact-match" in proc.stdout and "says nothing of new captchas" in proc.stdout


def test_prepare_nothing_usable(tmp):
    folder = tmp / "bad_only"
    folder.mkdir()
    (folder / "00001-abcd.png").write_text("text, not an image")
    Image.new("RGB", (120, 50)).save(folder / "00002-abc def.png")
    Image.new("RGB", (120, 50)).save(folder / "00003-ab\ncd\x1b[2J.png")   # a newline, a clear-screen sequence
    Image.new("RGB", (120, 50)).save(folder / "00004-ab\u202fcd.png")   # a narrow no-break space (macOS names)
    proc = run("captcha.py", "prepare", "--image-dir", folder, "--data-dir", tmp / "d3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no usable captcha image" in proc.stderr
    assert "00003-ab\\ncd\\x1b[2J.png" in proc.stdout and "\x1b" not in proc.stdout + proc.stderr   # printed escaped
    assert "00004-ab\u202fcd.png" in proc.stdout   # a space of another kind stays as it is: the name is the file's
    (tmp / "three.csv").write_text("a.png,abcd,x\nb.png,abce,x\nc.png,abcf,x\n")   # three fields: no line is read
    line = assert_one_line_error(run_main("captcha.py", "prepare", "--image-dir", folder, "--labels",
                                          tmp / "three.csv", "--data-dir", tmp / "d4"), 1)
    assert "most skipped: line of more than two fields" in line   # the cause, not its 4 "image not in the labels file"
    line = assert_one_line_error(run_main("captcha.py", "prepare", "--image-dir", tmp / "no\nsuch", "--data-dir",
                                          tmp / "d4"), 1)   # an error naming it: one line still
    assert "no\\nsuch" in line
    assert not (tmp / "d3" / "meta.json").exists()


def test_missing_model_and_models_of_other_scripts(tmp, trained, generated):
    image = sorted(generated.iterdir())[0]
    line = assert_one_line_error(run_main("captcha.py", "eval", "--model", tmp / "none.pt", image), 1)
    assert "none.pt" in line and "not found" in line
    torch.save({"script": "cifar_lenet", "model": {}}, tmp / "cifar.pt")
    line = assert_one_line_error(run_main("captcha.py", "eval", "--model", tmp / "cifar.pt", image), 1)
    assert "cifar_lenet.py" in line
    (tmp / "junk.pt").write_bytes(b"junk")
    assert_one_line_error(run_main("captcha.py", "eval", "--model", tmp / "junk.pt", image), 1)
    model = torch.load(trained[0] / "model.pt", weights_only=True)   # hand-edited reading entries: one line each
    for key, value in [("views", "abc"), ("views", [[0, 0, 1]]), ("views", [[0.5, 0]]), ("calibration", [1, 2]),
                       ("calibration", {"a": float("nan"), "b": 0.0})]:
        torch.save({**model, key: value}, tmp / "edited.pt")
        line = assert_one_line_error(run_main("captcha.py", "eval", "--model", tmp / "edited.pt", image), 1)
        assert f"{key} entry is malformed" in line


def test_train_without_or_with_foreign_data(tmp):
    line = assert_one_line_error(run_main("captcha.py", "train", "--data-dir", tmp / "nothing"), 1)
    assert "prepare" in line
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"kind": "cifar", "script": "cifar_resnet"}))
    line = assert_one_line_error(run_main("captcha.py", "train", "--data-dir", foreign), 1)
    assert "cifar_resnet.py" in line


def test_hostile_input_one_line_and_nothing_lost(tmp, trained):
    """Unreadable images and decompression bombs are one error object each in eval and skipped in prepare; a
    checkpoint, an empty folder, a damaged shard or meta.json are one line; a prepare that fails leaves DATA_DIR
    byte for byte as it was (in-process: the same main(), no interpreter start per case)."""
    src, _ = trained
    bad = hostile_images(tmp / "hostile")
    proc = run_main("captcha.py", "eval", "--data-dir", src, "--json", *(path for path, _ in bad))
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(rows) == len(bad)
    for row, (path, words) in zip(rows, bad):
        assert row["image"] == str(path) and words in row["error"], row
    line = assert_one_line_error(run_main("captcha.py", "eval", "--model", src / "checkpoint.pt", tmp / "x.png"), 1)
    assert "checkpoint" in line
    (tmp / "no_images").mkdir()
    assert "no images" in assert_one_line_error(run_main("captcha.py", "eval", "--data-dir", src,
                                                         tmp / "no_images"), 1)
    # among other inputs, a folder without images is answered as an image that cannot be read: the others are read
    image = next(p for p in sorted((tmp / "images").iterdir()) if p.name.startswith("0"))
    proc = run("captcha.py", "eval", "--data-dir", src, "--json", image, tmp / "no_images", "--device", "cpu")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1 and "code" in rows[0] and rows[1] == {
        "image": str(tmp / "no_images"), "error": "cannot read image: a folder with no images (.bmp, .gif, .jpeg, "
        ".jpg, .png, .webp)"}
    data = tmp / "keep"
    shutil.copytree(src, data)
    before = tree_bytes(data)
    line = assert_one_line_error(run_main("captcha.py", "prepare", "--image-dir", tmp / "hostile", "--data-dir", data,
                                          "--workers", 1), 1)
    assert "no usable captcha image" in line
    assert tree_bytes(data) == before and not [p for p in tmp.iterdir() if ".prepare-" in p.name]
    assert not (data / ".lock").exists()
    shard = data / "training_set.0.pt.gz"
    shard.write_bytes(before["training_set.0.pt.gz"][:100])
    assert "damaged" in assert_one_line_error(run_main("captcha.py", "train", "--data-dir", data), 1)
    (data / "meta.json").write_text("{not json")
    assert "not valid JSON" in assert_one_line_error(run_main("captcha.py", "train", "--data-dir", data), 1)
    (data / "meta.json").write_bytes(before["meta.json"].replace(b'"length"', b'"len"'))
    assert "'length'" in assert_one_line_error(run_main("captcha.py", "train", "--data-dir", data), 1)


def test_help_and_usage_errors():
    for args in ([], ["prepare"], ["train"], ["eval"], ["export"], ["serve"]):
        proc = run_main("captcha.py", *args, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout
        assert "(default: None)" not in proc.stdout and "(default: False)" not in proc.stdout   # nothing to show
    assert "(default: 0)" in run_main("captcha.py", "prepare", "--help").stdout   # --seed: a 0 is shown
    shown = run(GENERATE, "--help").stdout   # the generator's help alike
    assert "(default: 0)" in shown and "(default: None)" not in shown and "(default: False)" not in shown, shown
    assert "16,000,000" in run_main("captcha.py", "eval", "--help").stdout   # MAX_PIXELS, said in --help
    assert "the following arguments are required" in assert_one_line_error(run("captcha.py"), 2)   # a real process
    assert "tpu" in assert_one_line_error(run_main("captcha.py", "train", "--device", "tpu"), 2)


# ---- ship and serve ----
def test_export_onnx_reads_as_torch(trained, generated, tmp_path):
    """export -> model.onnx whose metadata holds what eval needs; eval of the .onnx gives the .pt's answers."""
    import onnxruntime
    data, _ = trained
    onnx, answers = check_onnx("captcha.py", data / "model.pt", sorted(generated.iterdir())[:24], tmp_path)
    meta = json.loads(onnxruntime.InferenceSession(str(onnx)).get_modelmeta().custom_metadata_map["suite"])
    model = torch.load(data / "model.pt", weights_only=True)
    assert meta["charset"] == model["charset"] and meta["image_size"] == list(model["image_size"])
    assert meta["calibration"] == model["calibration"] and "x: B,3,H,W" in meta["input"]
    assert {len(a["code"]) for a in answers} <= {4}
    mod = load_script("captcha.py")   # serving, ONNX Runtime's waiting threads sleep; eval keeps them spinning
    spinning = [mod.load_network(onnx, "cpu", serving=serving)[0].session.get_session_options()
                .get_session_config_entry("session.intra_op.allow_spinning") for serving in (False, True)]
    assert spinning == ["1", "0"]


def test_serve(trained, generated, tmp_path):
    """serve: /health, /info, the page, /predict by body and by multipart with eval's answers, a 4xx JSON error
    for each bad request (and serving on after it; a Host header naming another machine: DNS rebinding; a
    compressed body), 503 beyond UPLOADS_HELD bodies, a connection that sends nothing closed after HEADER_SECONDS,
    50 concurrent requests answered right in shared batches, the page used in a real browser, and a clean stop on
    Ctrl-C."""
    data, _ = trained
    images = sorted(generated.iterdir())[:50]
    ev = run("captcha.py", "eval", *images, "--data-dir", data, "--json", "--device", "cpu")
    expected = {}
    for line in ev.stdout.splitlines():
        answer = json.loads(line)
        expected[answer.pop("image")] = answer
    png = images[0].read_bytes()
    bomb = png_declaring(tmp_path / "bomb.png", 15000, 15000).read_bytes()
    with socket.create_server(("127.0.0.1", 0)) as taken:   # a port in use: one line before "serving"
        proc = run_main("captcha.py", "serve", "--data-dir", data, "--port", taken.getsockname()[1])
        assert "cannot listen there" in assert_one_line_error(proc, 1) and "serving" not in proc.stdout
    text_field = (b"--b\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--b--\r\n",
                  {"Content-Type": "multipart/form-data; boundary=b"})
    with serving("captcha.py", "--data-dir", data, "--device", "cpu", "--max-bytes", 20000,
                 "--max-wait-ms", 20, "--allowed-host", "Proxy.Example") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        idle, opened = socket.create_connection(("127.0.0.1", port)), time.time()   # sends nothing: closed in 10 s
        status, info = http(url + "/info")
        assert status == 200 and info["script"] == "captcha" and info["format"] == "torch"
        assert info["options"] == {"device": "cpu"}
        assert info["charset"] == torch.load(data / "model.pt", weights_only=True)["charset"]
        status, page = http(url + "/")
        assert status == 200 and 'type="file"' in page and 'fetch("predict"' in page and "http" not in page
        with urllib.request.urlopen(urllib.request.Request(url + "/", method="HEAD")) as response:   # monitors
            assert response.status == 200
        assert http(url + "/nothing") == (404, {"error": "Not Found"}) and http(url + "/openapi.json")[0] == 404
        with urllib.request.urlopen(urllib.request.Request(url + "/info", method="HEAD")) as response:
            assert response.status == 200
        assert http(url + "/info", b"x") == (405, {"error": "Method Not Allowed"})
        assert http(url + "/predict", png, {"Content-Type": "image/png"}) == (200, {"image": None,
                                                                                     **expected[str(images[0])]})
        assert http(url + "/health", None, {"Host": "proxy.example:8080"})[0] == 200   # --allowed-host: a proxy
        assert http(url + "/predict", *multipart("file", images[0].name, png)) == (200, {   # eval's "image": its name
            "image": images[0].name, **expected[str(images[0])]})
        for body, headers, status, words in [
                (b"not an image", {"Content-Type": "image/png"}, 400, "not an image"),
                (b"", {"Content-Type": "application/octet-stream"}, 400, "empty"),
                (bomb, {"Content-Type": "image/png"}, 400, "pixels"),
                (png[:200], {"Content-Type": "image/png"}, 400, "cannot read image"),
                (b"x" * 30000, {"Content-Type": "image/png"}, 413, "--max-bytes"),
                (png, {"Content-Type": "text/plain"}, 415, "content type"),
                (*text_field, 400, "no file field"),
                (*multipart("file", "big.png", b"x" * 30000), 413, "--max-bytes"),
                (png, {"Content-Type": "image/png", "Host": "rebound.example:80"}, 400, "answers requests to 127.0.0.1"),
                (png, {"Content-Type": "image/png", "Host": "[::1"}, 400, "Host '[::1'"),
                (png, {"Content-Type": "image/png", "Content-Encoding": "gzip"}, 415, "not compressed")]:
            got, answer = http(url + "/predict", body, headers)
            assert got == status and words in answer["error"], (words, got, answer)
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as gone:   # leaves mid-body
            gone.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 999\r\n\r\nabc")
        time.sleep(0.5)   # no traceback in the log for it (checked at the end)
        assert http(url + "/health")[0] == 200
        two_lengths = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
        for raw in (two_lengths, b"\x16\x03\x01\x00\xa5 a TLS hello\r\n\r\n"):   # what h11 cannot parse: JSON, as
            with socket.create_connection(("127.0.0.1", port)) as malformed:   # every refusal
                malformed.sendall(raw)
                assert malformed.makefile("rb").read().endswith(b'\r\n\r\n{"error": "not a valid HTTP request"}')
        mangled = (b"--XYZ\r\nContent-Disposition: form-data", {"Content-Type": "multipart/form-data; boundary=b"})
        assert http(url + "/predict", *mangled)[0] == 400   # and python-multipart's complaint is no log line (below)
        held = []   # raw bodies held at once: 16 x --max-bytes; a request beyond: 503, the next after them: served
        for _ in range(16):
            held.append(socket.create_connection(("127.0.0.1", port)))
            held[-1].sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 20000\r\n\r\n" + b"x" * 19999)
        time.sleep(1)
        got, answer = http(url + "/predict", png, {"Content-Type": "image/png"})
        assert got == 503 and "busy: 319,984 bytes of uploads" in answer["error"], (got, answer)
        assert http(url + "/predict", *multipart("file", "x.png", png))[0] == 503   # a multipart one counts too
        for connection in held:
            connection.close()
        time.sleep(0.5)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda p: http(url + "/predict", p.read_bytes(), {"Content-Type": "image/png"}),
                                    images))
        for path, (status, answer) in zip(images, answers):
            assert status == 200
            same_answers(answer, {"image": None, **expected[str(path)]}, 2e-4)
        health = http(url + "/health")[1]
        assert health["images"] == len(images) + 2 and health["batches"] < health["images"] - 10
        time.sleep(max(0.0, opened + 11 - time.time()))
        idle.settimeout(5)
        assert idle.recv(100) == b""   # closed by serve (HEADER_SECONDS), not left open for ever
        idle.close()
        browser = page_in_a_browser(url, images[0])
        if browser:
            answer, width = browser
            assert answer.startswith(f"code: {expected[str(images[0])]['code']}  (confidence ")
            assert width == Image.open(images[0]).width
    out, err = proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err and "Invalid HTTP" not in err and "boundary" not in err, err
    if not browser:   # everything else passed
        pytest.skip("the page was not tried in a browser: needs selenium, and Debian's chromium and "
                    "chromium-driver (.ci/run installs them)")


def page_in_a_browser(url, image):
    """serve's page in headless Chromium: pick an image; returns the answer the page shows and the width of the
    picture it drew, or None without selenium or Debian's chromium and chromium-driver."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        return None
    if not (chromium and chromedriver):
        return None
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "file").send_keys(str(image))
        shown = lambda d: d.find_element(By.ID, "answer").text
        answer = WebDriverWait(driver, 60).until(lambda d: shown(d).startswith(("code:", "error:")) and shown(d))
        return answer, driver.execute_script("return document.getElementById('view').width")
    finally:
        driver.quit()

