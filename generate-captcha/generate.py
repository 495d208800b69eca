"""Generate letters-and-digits captchas in the style of the C# library Hei.Captcha.

Usage:
    python generate-captcha/generate.py                      # 100,000 captchas -> generate-captcha/output/
    python generate-captcha/generate.py --count 2000 --seed 1 --output /tmp/heldout
    python generate-captcha/generate.py --fonts ~/my-fonts   # add every .ttf of a folder to the font pool

    python generate-captcha/generate.py --length 4-6 --size 200x50 --palette dark   # another style

Writes NNNNN-CODE.png (index zero-padded to at least 5 digits, the code as drawn, mixed case), 120x50 by default.
The same --seed and --count give the same images whatever --workers is: every image draws from its own
random generator seeded by (seed, index).
"""
import argparse
import contextlib
import ctypes
import math
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
try:
    import fcntl   # one generator per --output (not on Windows)
except ImportError:
    fcntl = None
from pathlib import Path

try:
    import matplotlib
    from matplotlib.ft2font import FT2Font
    from PIL import Image, ImageDraw, ImageFilter, ImageFont, PngImagePlugin
    from tqdm import tqdm
except KeyboardInterrupt:   # Ctrl-C while they load (a fraction of a second): one line, as later, no traceback
    sys.stderr.write("\ninterrupted\n")
    raise SystemExit(130) from None

# ---- Config ----
SIZE = (120, 50)
DIGITS = "23456789"
LETTERS = "".join(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in "ijloILO")
PALETTES = {  # name -> (background colours, ink colours)
    "hei": (["#FFFACD", "#FDF5E6", "#F0FFFF", "#BBFFFF", "#FAFAD2", "#FFE4E1", "#DCDCDC", "#F0E68C"],
            ["#00E5EE", "#000000", "#2F4F4F", "#43CD80", "#191970", "#006400", "#458B00", "#8B7765", "#CD5B45"]),
    "dark": (["#1B1B2F", "#2C2C54", "#3D3D3D", "#14213D", "#2F3E46", "#3C1518"],
             ["#FCA311", "#E5E5E5", "#8ECAE6", "#FFB4A2", "#B5E48C", "#F1FAEE"]),
}
FONT_SCALE = (0.9, 1.37)     # font size relative to the character tile
MAX_ANGLE = 45               # degrees, each tile rotated within +-MAX_ANGLE
BLUR_RADIUS = 0.4
N_CIRCLES = 15               # white circle outlines, radius 2..8 px
STYLES = ("regular", "bold", "italic", "bolditalic")
# matplotlib's TrueType families: style -> file (a missing style is drawn with a stroke or a shear)
MPL_FAMILIES = {
    "DejaVuSans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf"),
    "DejaVuSansMono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
                       "DejaVuSansMono-BoldOblique.ttf"),
    "DejaVuSerif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf"),
    "STIXGeneral": ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"),
    "ComputerModernRoman": ("cmr10.ttf", "cmb10.ttf", "cmti10.ttf", None),
    "ComputerModernSans": ("cmss10.ttf", None, None, None),
    "ComputerModernTypewriter": ("cmtt10.ttf", None, None, None),
}


class UserError(Exception):
    """A mistake said in one line: status 2 for the options (the default), 1 for the data or the system (a full disk,
    a worker killed)."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


class Terminated(BaseException):
    """SIGTERM (a `kill`, a scheduler): ends the run as Ctrl-C does, temp files removed."""


def on_sigterm(signum, frame):
    raise Terminated


# ---- Fonts ----
def font_pool(fonts_dir=None):
    """List of families; each family is a tuple of 4 font paths (regular, bold, italic, bold italic) or None."""
    mpl_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    pool = [tuple(str(mpl_dir / f) if f else None for f in files) for files in MPL_FAMILIES.values()]
    if fonts_dir is not None:
        try:
            extra = sorted(p for p in Path(fonts_dir).iterdir() if p.suffix.lower() == ".ttf" and p.is_file())
        except OSError as e:   # no permission to read it: one line, not a traceback
            raise UserError(f"--fonts {fonts_dir}: cannot read this folder ({e.strerror or e})")
        usable = []
        for p in extra:
            why = font_problem(str(p))
            if why:
                print(f"skipping font {shown(p)}: {why}", file=sys.stderr)
            else:
                usable.append(p)
        if not usable:
            print(f"--fonts {shown(fonts_dir)}: no usable .ttf font in it (subfolders and .otf are not read); the "
                  f"built-in fonts alone", file=sys.stderr)
        pool += [(str(p), None, None, None) for p in usable]
    return pool


def shown(text):
    """Text as printed: the bytes of a name that is not UTF-8 escaped (a strict UTF-8 stdout raises on them)."""
    return "".join(repr(c)[1:-1] if "\udc80" <= c <= "\udcff" else c for c in str(text))


def font_problem(path):
    """Why a font cannot draw the captchas, or None: each captcha character must map to a glyph of its own (a
    missing one would be drawn as the font's empty box, and the image would not show its file name's code) that
    draws something, and is that character's (not a symbol's, as in a symbol font)."""
    try:
        face = FT2Font(path)
        charmap = face.get_charmap()
        font = ImageFont.truetype(path, 32)
        masks = {c: font.getmask(c).getbbox() for c in DIGITS + LETTERS}
    except (OSError, RuntimeError, ValueError):
        return "it cannot draw every captcha character"
    if not (all(ord(c) in charmap and charmap[ord(c)] != 0 for c in DIGITS + LETTERS)
            and all(box is not None for box in masks.values()) and len(set(map(str, masks.values()))) > 1):
        return "it cannot draw every captcha character"
    names = {c: face.get_glyph_name(charmap[ord(c)]) for c in DIGITS + LETTERS}
    other = [c for c, name in names.items() if other_glyph(name, c)]
    if not other:
        return None
    first, name = other[0], names[other[0]]
    if not first.isdigit() and not other_glyph(name, first.swapcase()):
        return (f"it draws {first!r} as {first.swapcase()!r} ({name!r}): an all-caps or small-caps font cannot show "
                "the codes' case")
    return f"it draws other glyphs for {len(other)} captcha characters ({first!r} is {name!r}): a symbol font?"


NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def other_glyph(name, char):
    """Does a glyph's name say it draws something else (a symbol font maps 'a' to a glyph named 'turnstileright')?
    Glyph names follow the Adobe Glyph List (a, K, seven, seven.alt, sevenoldstyle, uni0037); a font without
    such names (glyph12, gid12, none) is given the benefit of the doubt."""
    expected = NUMBER_NAMES[int(char)] if char.isdigit() else char
    return (bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9_.]*", name))
            and not re.fullmatch(r"(?:glyph|gid|cid|index|char|g)\d+|uni[0-9A-F]{4}.*|u[0-9A-F]{4,6}.*", name, re.I)
            and not name.startswith(expected))


@lru_cache(maxsize=None)
def load_font(path, size):
    return ImageFont.truetype(path, size)


# ---- Drawing ----
def random_code(rng, length):
    return "".join(rng.choice(DIGITS) if rng.random() < 0.5 else rng.choice(LETTERS) for _ in range(length))


def random_points(rng, n, w, h):
    return [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(n)]


def light_colour(rng):
    """A light colour for the background polyline."""
    return tuple(rng.randint(190, 240) for _ in range(3))


def draw_background(rng, style):
    (width, height), backgrounds = style["size"], style["palette"][0]
    img = Image.new("RGB", (width, height), rng.choice(backgrounds))
    # soft glow: a white ellipse, blurred, blended in
    glow = Image.new("L", (width, height), 0)
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    rx, ry = rng.uniform(20, 60), rng.uniform(10, 25)
    ImageDraw.Draw(glow).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=rng.randint(60, 140))
    glow = glow.filter(ImageFilter.BoxBlur(8))
    img.paste((255, 255, 255), mask=glow)
    ImageDraw.Draw(img).line(random_points(rng, 8, width, height), fill=light_colour(rng), width=1)
    return img


def draw_character(rng, char, families, tile, inks):
    """One character on a transparent square canvas larger than its tile, with a polyline, rotated."""
    family = rng.choice(families)
    style = rng.randrange(len(STYLES))
    path = family[style] or family[0]
    size = max(8, round(tile * rng.uniform(*FONT_SCALE)))
    font = load_font(path, size)
    ink = rng.choice(inks)
    side = 2 * size
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    stroke = 1 if family[style] is None and STYLES[style] in ("bold", "bolditalic") else 0
    draw.text((side / 2, side / 2), char, font=font, fill=ink, anchor="mm", stroke_width=stroke, stroke_fill=ink)
    offset = (side - tile) / 2
    draw.line([(x + offset, y + offset) for x, y in random_points(rng, 6, tile, tile)], fill=ink, width=1)
    if family[style] is None and STYLES[style] in ("italic", "bolditalic"):  # synthetic italic: shear
        canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, 0.25, -0.125 * side, 0, 1, 0),
                                  resample=Image.Resampling.BILINEAR)
    return canvas.rotate(rng.uniform(-MAX_ANGLE, MAX_ANGLE), resample=Image.Resampling.BICUBIC)


def draw_circles(rng, img):
    """About N_CIRCLES white circle outlines that do not touch each other."""
    width, height = img.size
    draw = ImageDraw.Draw(img)
    circles = []
    for _ in range(N_CIRCLES * 4):
        if len(circles) == N_CIRCLES:
            break
        r = rng.uniform(2, 8)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if all(math.hypot(x - cx, y - cy) > r + cr + 2 for cx, cy, cr in circles):
            circles.append((x, y, r))
            draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 255), width=rng.choice((1, 1, 2)))


def draw_captcha(rng, code, families, style):
    img = draw_background(rng, style)
    width, height = style["size"]
    tile = min(width / len(code), height)
    for i, char in enumerate(code):
        glyph = draw_character(rng, char, families, round(tile), style["palette"][1])
        x = round(i * tile + tile / 2 - glyph.width / 2)
        y = round(height / 2 - glyph.height / 2)
        img.paste(glyph, (x, y), glyph)
    img = img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    draw_circles(rng, img)
    return img


# ---- Workers ----
_JOB = {}


def init_worker(job):
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the main process's to handle: no worker tracebacks
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the pool ends its workers with it
    if sys.platform.startswith("linux"):   # and a kill -9 of generate.py too (they waited for work forever)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        if job["parent"] is not None and os.getppid() != job["parent"]:   # it ended before that
            os._exit(1)
    forked_on_linux = sys.platform.startswith("linux") and job["parent"] is not None
    if not forked_on_linux and (command := multiprocessing.parent_process()) is not None:   # a forkserver's, spawned
        threading.Thread(target=lambda: command.join() or os._exit(1), daemon=True).start()
    if job["lock"] is not None:   # the --output lock is the main process's: a worker left behind must not hold it
        os.close(job["lock"])
    _JOB.update(job)


def generate_range(start_stop):
    """Draw and save images start..stop-1; every image has its own generator seeded by (seed, index)."""
    job = _JOB
    for index in range(*start_stop):
        rng = random.Random(f"hei-captcha:{job['seed']}:{index}")
        low, high = job["length"]
        code = random_code(rng, low if low == high else rng.randint(low, high))
        img = draw_captcha(rng, code, job["families"], job["style"])
        name = f"{index:0{job['digits']}d}-{code}.png"
        tmp = Path(job["output"]) / f".{name}.tmp"
        img.save(tmp, format="PNG", compress_level=1, pnginfo=PNG_INFO)
        os.replace(tmp, Path(job["output"]) / name)
    return start_stop[1] - start_stop[0]


MARK = "generate-captcha/generate.py"   # each PNG's Software text: what --clean may replace (a user's own, never)
PNG_INFO = PngImagePlugin.PngInfo()
PNG_INFO.add_text("Software", MARK)
CAPTCHA_NAME = re.compile(r"^\d{5,}-[0-9A-Za-z]+\.png$")
SWAP_MARK = ".generate-swap"   # in --output while a run swaps its captchas in: its staging folder and the new names


def length_range(text):
    """--length N or A-B -> (low, high), 1 <= low <= high <= 16."""
    low, dash, high = text.partition("-")
    if (not low.isdigit() or not (high or low).isdigit() or (dash and not high)
            or not 1 <= int(low) <= int(high or low) <= 16):
        raise argparse.ArgumentTypeError(f"expected N or A-B with 1 <= A <= B <= 16, got {text!r}")
    return int(low), int(high or low)


def whole_number(low, high):
    """argparse type: a whole number from low to high."""
    def parse(text):
        if not text.strip().lstrip("-").isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}")
        return int(text)
    return parse


def image_size(text):
    """--size WxH -> (W, H), each from 16 to 1024 pixels."""
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit() and 16 <= int(w) <= 1024 and 16 <= int(h) <= 1024):
        raise argparse.ArgumentTypeError(f"expected WxH such as 200x50 (16 to 1024 pixels each), got {text!r}")
    return int(w), int(h)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show (None, or a flag's False)."""

    def _get_help_string(self, action):   # the method argparse's own ArgumentDefaultsHelpFormatter overrides
        shown = not (action.default is None or action.default is False)   # 0 == False: compared by identity
        return super()._get_help_string(action) if shown else action.help


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other mistake
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    p = Parser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--count", type=whole_number(1, 10 ** 8), default=100000, help="number of captchas")
    p.add_argument("--output", default=str(Path(__file__).parent / "output"), help="output folder")
    p.add_argument("--length", type=length_range, default="4", metavar="N|A-B",
                   help="characters per captcha: N, or A-B for lengths drawn uniformly from A to B")
    p.add_argument("--size", type=image_size, default=f"{SIZE[0]}x{SIZE[1]}", metavar="WxH",
                   help="image size in pixels (at least 8 wide per character)")
    p.add_argument("--palette", choices=sorted(PALETTES), default="hei", help="background and ink colours")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--workers", type=whole_number(1, 256), default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--fonts", default=None, help="folder of extra .ttf fonts added to the pool")
    p.add_argument("--clean", action="store_true",
                   help="replace the captchas an earlier run wrote in --output (never other files)")
    return p


def ours(path):
    """A PNG this generator wrote (its Software text), read from the header alone."""
    try:
        if not path.is_file():   # a FIFO would block open() forever
            return False
        with Image.open(path, formats=["PNG"]) as img:
            return img.info.get("Software") == MARK
    except Exception:   # a folder, not a PNG, unreadable: not ours
        return False


def run(args):
    if args.fonts is not None and not Path(args.fonts).is_dir():
        raise UserError(f"--fonts {args.fonts}: {'not a folder' if Path(args.fonts).exists() else 'folder not found'}")
    if not args.output:
        raise UserError("--output: empty; name a folder")
    if args.size[0] < 8 * args.length[1]:
        raise UserError(f"--size {args.size[0]}x{args.size[1]}: {args.size[0] // args.length[1]} px wide for each of "
                        f"{args.length[1]} characters; at least 8 (--size {8 * args.length[1]}x{args.size[1]})")
    families = font_pool(args.fonts)
    out = Path(args.output)
    return write_captchas(args, families, out, made=not os.path.lexists(out))


def write_captchas(args, families, out, made):
    """run's work once the options are checked: lock --output, check what it holds, draw, swap. made: the folder is
    new; if the run fails or is interrupted before writing in it, it goes again (once locked: never another run's)."""
    lock = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:   # held until the run ends
            lock = os.open(out, os.O_RDONLY)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        old = [p for p in out.iterdir() if CAPTCHA_NAME.match(p.name)]
    except BlockingIOError:
        raise UserError(f"--output {out}: another generate.py is writing there; wait for it or choose another folder")
    except OSError as e:   # a file of that name, a folder that takes no new entry
        raise UserError(f"--output {out}: {e.strerror or e}")
    try:
        return fill(args, families, out, old, lock)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()   # only if empty
        raise
    finally:
        if lock is not None:   # a second run in the same process (main() called again) finds it free
            os.close(lock)


def fill(args, families, out, old, lock):
    """write_captchas' work with --output locked: check what it holds, draw aside, swap."""
    foreign = [p.name for p in old if not ours(p)]
    with contextlib.suppress(OSError):
        (out / f"{SWAP_MARK}.tmp").unlink(missing_ok=True)   # a mark being written when its run was killed
    if os.path.lexists(out / SWAP_MARK):   # a run killed in its swap: the folder holds some of each set
        old = finish_swap(out, args.clean)
        foreign = [p.name for p in old if not ours(p)]
    for stale in out.glob(".generate-*") if fcntl is not None or args.clean else []:   # left by a run killed
        with contextlib.suppress(OSError):   # outright: with the lock held, none is in use (unreadable: left)
            if re.fullmatch(r"\.generate-\d+", stale.name) and stale.is_dir() and not stale.is_symlink() and all(
                    CAPTCHA_NAME.match(f.name.removeprefix(".").removesuffix(".tmp")) for f in stale.iterdir()):
                shutil.rmtree(stale, ignore_errors=True)   # only a staging folder of ours: a user's .generate-x stays
    if foreign:   # named like captchas, but not of a run of this generator: a user's own, never removed
        raise UserError(f"{out} holds {len(foreign)} files named like captchas that no earlier run wrote there (e.g. "
                        f"{foreign[0]}: a user's own, or from a version of generate.py before its mark); move them, "
                        f"or choose another --output")
    if old and not args.clean:
        raise UserError(f"{out} already holds {len(old)} captchas of an earlier run; pass --clean to replace them "
                        "or choose another --output")
    staged = out / f".generate-{os.getpid()}"   # the new captchas are drawn here, then replace the old ones at once
    try:
        staged.mkdir()
    except OSError as e:   # a folder that takes no new entry
        raise UserError(f"--output {out}: {e.strerror or e}")
    try:
        return draw_all(args, families, out, staged, old, lock)
    finally:   # done, failed or interrupted: the staging folder goes (not while a failed swap's mark names it: the
        if not os.path.lexists(out / SWAP_MARK):   # next run finishes it); the old captchas stay unless replaced
            shutil.rmtree(staged, ignore_errors=True)


def swap_in(out, staged, names, old):
    """The new captchas `names` from `staged` into `out` (same names replaced at once), then the `old` rest out."""
    for name in names:
        os.replace(staged / name, out / name)
    remove_old(out, names, old)


def remove_old(out, names, old):
    """The `old` captchas out of `out`, where the new ones `names` are now."""
    new = {name.lower(): out / name for name in names}
    for p in set(old) - set(new.values()):   # on a disk that ignores case an old name can be a new file's
        twin = new.get(p.name.lower())          # (e5m7, e5M7): that one stays
        with contextlib.suppress(FileNotFoundError):
            if not (twin is not None and os.path.samefile(p, twin)):
                p.unlink()


def finish_swap(out, clean):
    """The swap of a run killed or failed in it (SWAP_MARK still in `out`) done as that run asked, its new set in place
    of the old one, once every new captcha is in `out`; returns the captchas `out` holds then. New captchas missing
    (their staging folder gone): the old set stays, and only a --clean run goes on (it replaces both)."""
    mark = out / SWAP_MARK
    try:
        if mark.is_symlink() or not mark.is_file() or mark.stat().st_size > 64 << 20:
            raise ValueError("not a file of this size")
        lines = mark.read_text(encoding="utf-8", errors="replace").splitlines()
    except (OSError, ValueError):
        lines = []
    staged = out / lines[0] if lines and re.fullmatch(r"\.generate-\d+", lines[0]) else None
    names = sorted({name for name in lines[1:] if CAPTCHA_NAME.match(name)})
    if staged is None or not names:
        raise UserError(f"--output {out}: {SWAP_MARK} is not a file generate.py wrote; remove it and check the folder")
    for name in names:   # the new captchas still in the staging folder go in
        try:
            os.replace(staged / name, out / name)
        except FileNotFoundError:   # in place already
            pass
        except OSError as e:
            raise UserError(f"--output {out}: a run stopped in its swap left some of each set, and {name} cannot go "
                            f"in place ({e.strerror or e}); make the folder writable and run again", 1)
    captchas = [p for p in out.iterdir() if CAPTCHA_NAME.match(p.name)]
    if missing := [name for name in names if not os.path.lexists(out / name)]:
        if not clean:
            raise UserError(f"--output {out}: a run stopped in its swap left some of each set, and {len(missing)} of "
                            f"its new captchas are gone; run again with --clean (it replaces both)")
        with contextlib.suppress(OSError):   # left: the next --clean run says it again
            mark.unlink(missing_ok=True)
        shutil.rmtree(staged, ignore_errors=True)
        return captchas
    new = set(names)
    try:
        remove_old(out, names, [p for p in captchas if p.name not in new and ours(p)])   # a user's own stay
        mark.unlink(missing_ok=True)
    except OSError as e:   # an old captcha that cannot go (held open on Windows, read-only)
        raise UserError(f"--output {out}: a run stopped in its swap left some of each set, and the old ones cannot "
                        f"all go ({e.filename and Path(e.filename).name}: {e.strerror or e}); make the folder "
                        f"writable and run again", 1)
    shutil.rmtree(staged, ignore_errors=True)
    print(f"--output {shown(out)}: a run stopped while it swapped its captchas in: its {len(names)} captchas put in "
          f"place", file=sys.stderr)
    return [p for p in out.iterdir() if CAPTCHA_NAME.match(p.name)]


def draw_all(args, families, out, staged, old, lock=None):
    # a forked worker holds a copy of the lock's descriptor, to close; a spawned one (macOS, Windows) has none
    forked = multiprocessing.get_start_method() == "fork"
    job = {"lock": lock if forked else None, "parent": os.getpid() if forked else None, "seed": args.seed,
           "length": args.length, "families": families,
           "output": str(staged), "style": {"size": args.size, "palette": PALETTES[args.palette]},
           "digits": max(5, len(str(args.count - 1)))}
    chunk = 200
    ranges = [(s, min(s + chunk, args.count)) for s in range(0, args.count, chunk)]
    start = time.perf_counter()
    bar = tqdm(total=args.count, unit="img", disable=not sys.stderr.isatty(), file=sys.stderr)
    try:
        workers = args.workers
        try:
            pickle.dumps(generate_range)
        except Exception:   # a module loaded under no importable name: its workers could not find it (they hung)
            workers = 1
        if workers == 1:
            _JOB.update(job)   # not init_worker: this process keeps its own Ctrl-C and SIGTERM handling
            for n in map(generate_range, ranges):
                bar.update(n)
        else:
            with ProcessPoolExecutor(workers, initializer=init_worker, initargs=(job,)) as pool:
                chunks = [pool.submit(generate_range, r) for r in ranges]   # not map(): it cancels what is left, and
                try:                                                        # Python 3.11's pool then printed an
                    for chunk in chunks:                                    # InvalidStateError traceback
                        bar.update(chunk.result())
                except BaseException:   # Ctrl-C, SIGTERM, an error: the workers stop now, as Pool's did (no public
                    for worker in list((getattr(pool, "_processes", None) or {}).values()):   # way before 3.14);
                        worker.terminate()   # the pool then fails the chunks left
                    raise
    except BrokenProcessPool:   # a worker killed (out of memory): multiprocessing.Pool waited for it forever
        raise UserError("a worker process died (out of memory, or killed); nothing was replaced; run it again, with "
                        "fewer --workers", 1)
    except OSError as e:   # a full disk, a read-only folder
        raise UserError(f"--output {out}: {e.strerror or e}", 1)
    finally:
        bar.close()
    with signals_held():   # the swap whole: the new set in (same names replaced at once), then the old rest out
        try:
            names = sorted(p.name for p in staged.iterdir() if CAPTCHA_NAME.match(p.name))
            (out / f"{SWAP_MARK}.tmp").write_text("\n".join([staged.name, *names]) + "\n", encoding="utf-8")
            os.replace(out / f"{SWAP_MARK}.tmp", out / SWAP_MARK)   # a kill from here on: the next run finishes it
            swap_in(out, staged, names, old)
            (out / SWAP_MARK).unlink(missing_ok=True)
        except OSError as e:
            then = ("the next run on this folder finishes the swap" if os.path.lexists(out / SWAP_MARK) else
                    "nothing was replaced")
            raise UserError(f"--output {out}: cannot put all the new captchas in place ({e.strerror or e}); {then}", 1)
    seconds = time.perf_counter() - start
    print(f"wrote {args.count} captchas to {shown(out)} in {seconds:.1f}s ({args.count / seconds:.0f} images/s)")
    return 0


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait while the body runs, then act (130 / 143): the swap of the sets is never cut."""
    got, before = [], {}
    try:
        with contextlib.suppress(ValueError):   # not the main thread: signals are not ours to hold
            for s in (signal.SIGINT, signal.SIGTERM):
                before[s] = signal.signal(s, lambda signum, frame: got.append(signum))
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if got:
            raise KeyboardInterrupt() if got[0] == signal.SIGINT else Terminated()


def main(argv=None):
    args = build_parser().parse_args(argv)
    before = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):   # main() called from another thread keeps the default
        if before is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {shown(e)}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return 143
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
