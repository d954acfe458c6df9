"""Audio decode / resample / encode: pure functions shared by the shard builder and the data loader.

Conventions:
- samples are float32 in [-1, 1];
- `decode_audio` always returns a 2-D array shaped (channels, frames), even for mono, so callers never
  branch on ndim; `to_mono` turns that into 1-D (frames,), which is what every other function here
  takes and returns (and what the shards store).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 16000
# Extensions the builder picks up from a folder. libsndfile reads the native ones; the rest (raw .gsm
# telephone prompts) go through the sox binary.
_NATIVE_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif")
AUDIO_EXTENSIONS = _NATIVE_EXTENSIONS + (".gsm",)
# Formats whose header states the exact length, so a shorter read means a truncated file (mp3/ogg
# headers only estimate it).
_EXACT_LENGTH_FORMATS = {"WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF"}


class AudioDecodeError(Exception):
    """Audio that cannot be used; `reason` is a short phrase meant for rejected.jsonl and metrics labels."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _checked(x: np.ndarray, sr: int) -> tuple[np.ndarray, int]:
    if x.size == 0 or x.shape[-1] == 0:
        raise AudioDecodeError("zero-length audio")
    if not np.isfinite(x).all():
        raise AudioDecodeError("NaN or inf samples")
    if sr <= 0:
        raise AudioDecodeError(f"invalid sample rate {sr}")
    return x, int(sr)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an in-memory file (any format libsndfile reads) -> (float32 (channels, frames), sample rate)."""
    if not data:
        raise AudioDecodeError("empty file")
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception as e:  # libsndfile raises several types; all mean "not audio we can read"
        # error_string is libsndfile's own text, without the BytesIO repr (and its address) of str(e)
        raise AudioDecodeError(f"undecodable: {getattr(e, 'error_string', None) or _short(e)}") from None
    with f:
        expected, exact, sr = f.frames, f.format in _EXACT_LENGTH_FORMATS, f.samplerate
        try:
            x = f.read(dtype="float32", always_2d=True)
        except Exception as e:  # noqa: BLE001 - a readable header, then a broken stream
            raise AudioDecodeError(f"corrupt: {getattr(e, 'error_string', None) or _short(e)}") from None
    # libsndfile returns what it could read without an error, and sizes a WAV or AIFF by the file's length
    if (exact and 0 < x.shape[0] < expected) or _declared_past_end(data, len(data)):
        raise AudioDecodeError(f"truncated: {x.shape[0]} frames read, the header promises more")
    return _checked(np.ascontiguousarray(x.T), sr)


def _declared_past_end(head: bytes, file_size: int) -> bool:
    """A RIFF/WAVE or AIFF/AIFC file (its first bytes `head`) whose audio chunk claims more bytes than the
    file has: libsndfile reads what is there without a word. 0 and 0xFFFFFFFF are the sizes streaming
    writers leave, not a truncation; an audio chunk that starts past `head` cannot be judged (False)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        order, audio_chunk = "little", b"data"
    elif head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        order, audio_chunk = "big", b"SSND"
    else:
        return False
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], order)
        if chunk == audio_chunk:
            return size not in (0, 0xFFFFFFFF) and pos + 8 + size > file_size
        pos += 8 + size + (size & 1)
    return False


def _file_truncated(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return _declared_past_end(f.read(1 << 16), os.fstat(f.fileno()).st_size)


def decode_mono(data: bytes) -> tuple[np.ndarray, int]:
    """decode_audio + to_mono: what the training loader wants from a shard's <key>.flac."""
    x, sr = decode_audio(data)
    return to_mono(x), sr


def to_mono(x: np.ndarray) -> np.ndarray:
    """(channels, frames) or (frames,) -> float32 (frames,) by averaging channels."""
    if x.ndim == 1:
        return x.astype(np.float32, copy=False)
    if x.ndim != 2:
        raise ValueError(f"to_mono expects 1-D or (channels, frames), got shape {x.shape}")
    if x.shape[0] == 1:
        return x[0].astype(np.float32, copy=False)
    return x.mean(axis=0, dtype=np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample 1-D or (channels, frames) float32 audio with soxr HQ; a no-op when rates match."""
    if sr_in == sr_out:
        return x.astype(np.float32, copy=False)
    if x.ndim == 1:
        return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)
    # soxr wants (frames, channels)
    y = soxr.resample(np.ascontiguousarray(x.T), sr_in, sr_out, quality="HQ")
    return np.ascontiguousarray(y.T, dtype=np.float32)


# Shard codecs: FLAC (about half the bytes) or WAV PCM (no decode cost beyond a copy); both 16-bit.
CODECS = {"flac": "FLAC", "wav": "WAV"}


def encode_audio(x: np.ndarray, sr: int, codec: str = "flac") -> bytes:
    """Mono float audio -> FLAC or WAV bytes (PCM_16). Clips to [-1, 1] first: resampling can overshoot
    slightly and libsndfile would otherwise wrap out-of-range samples instead of clipping them."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    buf = io.BytesIO()
    sf.write(buf, np.clip(to_mono(x), -1.0, 1.0), sr, format=CODECS[codec], subtype="PCM_16")
    return buf.getvalue()


def encode_flac(x: np.ndarray, sr: int) -> bytes:
    return encode_audio(x, sr, "flac")


def probe(path: str | Path) -> tuple[int, int] | None:
    """(frames, sample rate) from the file's header only, or None when libsndfile cannot tell (other
    formats, or a broken file: decoding it later gives the reason)."""
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        return None
    return (int(info.frames), int(info.samplerate)) if info.frames > 0 and info.samplerate > 0 else None


def load_frames(path: str | Path, start: int, stop: int) -> tuple[np.ndarray, int]:
    """Frames [start, stop) of a file libsndfile reads -> (mono float32, native rate), reading only that
    part: a segment of a ten-hour recording costs a segment's memory. A WAV or AIFF cut short is refused
    for every segment, as decode_audio refuses it whole: libsndfile would size it by what is left."""
    try:
        truncated = _file_truncated(path)
    except FileNotFoundError:
        raise AudioDecodeError("missing file") from None
    except OSError as e:
        raise AudioDecodeError(f"unreadable: {_short(e)}") from None
    if truncated:
        raise AudioDecodeError("truncated: the header promises more audio than the file holds")
    try:
        x, sr = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise AudioDecodeError("missing file") from None
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types
        raise AudioDecodeError(f"undecodable: {getattr(e, 'error_string', None) or _short(e)}") from None
    if x.shape[0] < stop - start:
        raise AudioDecodeError(f"truncated: frames {start}-{stop} requested, {x.shape[0]} read")
    x, sr = _checked(np.ascontiguousarray(x.T), sr)
    return to_mono(x), sr


def load_file(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a file -> (mono float32 (frames,), native sample rate). Falls back to the `sox` binary (if
    installed) for formats libsndfile cannot read, e.g. raw .gsm telephone prompts."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AudioDecodeError("missing file") from None
    except OSError as e:
        raise AudioDecodeError(f"unreadable: {_short(e)}") from None
    if not data:
        raise AudioDecodeError("empty file")
    try:
        x, sr = decode_audio(data)
    except AudioDecodeError as e:
        if not e.reason.startswith("undecodable") or shutil.which("sox") is None:
            raise
        try:
            x, sr = _decode_with_sox(path)
        except AudioDecodeError as sox_error:
            # for a format libsndfile knows, its reason is the informative one
            native = path.suffix.lower() in _NATIVE_EXTENSIONS
            raise (e if native else sox_error) from None
    return to_mono(x), sr


def _decode_with_sox(path: Path) -> tuple[np.ndarray, int]:
    # Through a temp file, not stdout: a WAV written to a pipe has no valid length in its header.
    with tempfile.TemporaryDirectory(prefix="unfused-sox-") as tmp:
        out = Path(tmp) / "decoded.wav"
        proc = subprocess.run(
            ["sox", "-q", str(path), "-e", "floating-point", "-b", "32", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0 or not out.exists():
            msg = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise AudioDecodeError(f"undecodable (sox): {msg[:120]}")
        return decode_audio(out.read_bytes())


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:120]
