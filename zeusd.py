#!/usr/bin/env python3
"""zeusd: the Zeus daemon in one file.

Runs as root on a GPU node and serves an HTTP API, on a Unix socket or TCP, that lets
unprivileged programs change NVIDIA GPU settings (power limit, locked clocks, persistence
mode) and read or stream GPU power (NVML) and CPU/DRAM power (RAPL), with optional JWT
scopes. Standard library only, plus pynvml (nvidia-ml-py); Python 3.6 or newer.

    python zeusd.py serve --help
    python zeusd.py token issue --help
    python zeusd.py status --help     (also: release, receipts, policy check)

The file reads from the ground up, in four parts, each opened by a `# ==== Part: ... ====`
banner; each section starts with a `# ---- Name: its job ----` line, named here as there:
Ground: what every part uses; it knows no device and no HTTP
  Configuration          API groups, default paths, durations, U32_MAX
  Logging                LineStyle (time or journald priority), audit, RequestLines
  Errors                 StartupError, DeviceError (what failed, not how HTTP says it),
                         ReadErrors
  Files                  read_small_file: the admin's files and the state files, regular, small
  TOML subset            TomlReader, read_trusted_toml: the override and policy files
  Processes              session_of (who leads a caller's session), alive, process_uid,
                         slurm_job_of, whether /proc hides other users' processes
Device core: it knows nothing of HTTP; who asks reaches it as data (an Owner, a gone() check,
an abandon() callback)
  Devices, GPUs          GpuBackend (the interface), NvmlBackend, TimedLibrary (NVML at debug)
  GPU command overrides  load_overrides, CommandOverride, run_command (bounded),
                         OverriddenBackend
  Devices, CPUs          RaplCounter, RaplPackage, RaplWrapGuard
  Bounded waits          wait_until, BoundedCalls: request-path reads with a time limit
  GPU control            ControlJob (with its audit line), GpuControl: one worker per GPU
  State files            check_state_directory, Hold (one GPU's hold as data), HoldStore
                         (holds.json, read-modify-write under flock)
  Receipts               receipt_of, Receipts (receipts.jsonl, one line per ended hold)
  Restores               RestoreJob: the saved settings put back on the GPU's worker
  Holds                  Owner, HoldClaim (what a change asks of the holds), Holds: conflicts
                         decided in Holds.refusal, claims, changes on record, releases
  Holds watcher          HoldsWatcher: restores when sessions end or tokens expire, adoption
  Sampling               Sample, FailureLog, GpuPowerMeter, CpuPowerMeter, Sampler (its
                         subscriber protocol in its docstring)
  Node                   Node: the devices, samplers and workers the enabled groups need
HTTP: from the status of a reply to the bytes on the wire
  HTTP, replies          Reply, reply_bytes, HttpError, the DeviceError -> status mapping
  HTTP, query parameters parse_query and its value parsers, select_ids
  Authentication         verify_token, Authenticator: HS256 tokens, scopes, gpus, admin
  Access policy          load_policy, Policy (the admin's tables), Grant, policy_refusal,
                         log_policy
  Callers                client_key, Principal (who asks), UserDirectory (names and groups)
  Access                 Access: every "may this caller do this" (scopes, GPUs; a change's
                         policy 403, ranges 400, held, in-use and budget 409), Refused
  HTTP, metrics          Metrics: request counts and the Prometheus scrape
  HTTP, streams          PowerRendering (bodies and SSE events, once per sample), SseSubscriber
  HTTP, control handlers ControlHandlers: changes, holds, releases, the caller's policy
  HTTP, read handlers    ReadHandlers: power, streams, energy, limits, constraints
  HTTP, API              Api.handle(request): group gate, auth, route, method, parameters
  HTTP, heads            parse_head: strict heads, the lines met before read from a cache
  HTTP, framing          RequestReader: requests read off a socket, bodies within limits
  HTTP, connection       Caller (who asks), HttpConnection (serve, reply, stream)
Programs: the servers, the commands that ask a daemon, the command line, main
  Connection limits      Rejecter, Slot, ConnectionCap: the cap and fair share
  Servers                TcpServer, UnixServer, the socket file's safety, open_server
  Daemon client          HttpReader, DaemonClient: what status, release and receipts read
  Status                 `zeusd status`: the table, StreamFollower
  Release and receipts   `zeusd release`, `zeusd receipts`: receipt_row, since_arg
  Policy check           `zeusd policy check`: policy_rules
  Command line           build_parser and its flag types
  Main                   serve (startup order, signals), issue, main
Background workers (GpuControl, HoldsWatcher, BoundedCalls, RaplWrapGuard, Sampler, Rejecter)
have start() and stop().

The route of `GET /gpu/get_power`: ConnectionCap.process_request admits the connection (cap,
fair share) and starts HttpConnection on a thread; RequestReader.next_request reads the head
(parse_head, or the same Request again for a head that asks the same); Api.handle gates the
group, authenticates, routes to ReadHandlers.gpu_power (a part of Api), which takes
Access.gpus_for the ids and ReadHandlers.power the values: Sampler.current gives a fresh
Sample (read by the relays through GpuPowerMeter -> NvmlBackend.power_mw), PowerRendering.power
renders its body once; the connection writes its reply in one sendall, counts it and logs it
(RequestLines).
"""

import argparse
import base64
import binascii
import calendar
import collections
import contextlib
import ctypes
import errno
import fcntl
import grp
import hashlib
import hmac
import json
import logging
import os
import pwd
import queue
import re
import resource
import select
import shlex
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from json.encoder import encode_basestring_ascii as encode_json_string
from urllib.parse import unquote_plus

__version__ = "0.5.0"
VERSION_LINE = "zeusd %s (Python; zeusd HTTP API 0.4.0 + 0.5 superset)" % __version__

log = logging.getLogger("zeusd")


# ==== Ground: what every part uses; it knows no device and no HTTP ====

# ---- Configuration: API groups, token lifetimes, whole-value patterns ----

API_GROUPS = ("gpu-control", "gpu-read", "cpu-read")
ROOT_GROUPS = ("gpu-control", "cpu-read")
STREAM_FORMATS = ("all-devices", "per-device")
STREAM_FORMAT_CLIENTS = {
    "per-device": "for Zeus 0.16 and newer, what pip install zeus gives; Zeus 0.15 needs "
                  "--stream-format all-devices",
    "all-devices": "for Zeus 0.15 and older; Zeus 0.16 and newer need --stream-format "
                   "per-device, the default"}
RUN_DIRECTORY = "/run/zeusd"  # 0755 whichever daemon makes it, so that the socket stays reachable
DEFAULT_SOCKET_PATH = RUN_DIRECTORY + "/zeusd.sock"
DEFAULT_STATE_DIR = RUN_DIRECTORY + "/state"
RAPL_DIRS = ("/sys/class/powercap/intel-rapl", "/zeus_sys/class/powercap/intel-rapl")
DURATION_UNITS = {}
for _names, _seconds in ((("s", "sec", "secs", "second", "seconds"), 1),
                         (("m", "min", "mins", "minute", "minutes"), 60),
                         (("h", "hr", "hrs", "hour", "hours"), 3600),
                         (("d", "day", "days"), 86400),
                         (("w", "week", "weeks"), 604800)):
    DURATION_UNITS.update(dict.fromkeys(_names, _seconds))
# Every pattern here is used with fullmatch: `$` would also match before a trailing newline.
DIGITS = re.compile(r"[0-9]{1,10}")  # enough for any 32-bit value, and int() stays cheap
DURATION_TERM = re.compile(r"\s*([0-9]{1,12})\s*([a-z]+)\s*")
DURATION_FORMS = ("'never' or '0' (no expiry), or <number><unit> terms such as 90s, 15m, 1h, "
                  "1h30m, 7d, 2w, 30days (units: s, m, h, d, w and their long names)")
LATEST_EXPIRY = 253402300799  # 9999-12-31T23:59:59Z


def parse_group_list(values, allow_all=False):
    """API groups from comma-separated and/or repeated values, order kept, duplicates dropped;
    with allow_all, 'all' stands for every group."""
    groups = []
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if not name:
                continue
            if allow_all and name == "all":
                groups.extend(g for g in API_GROUPS if g not in groups)
                continue
            if name not in API_GROUPS:
                raise ValueError("unknown API group '%s' (choose from %s)"
                                 % (name, ", ".join(API_GROUPS)))
            if name not in groups:
                groups.append(name)
    return groups


def parse_duration(text):
    """Seconds in a token lifetime such as '1h30m' (any case), or None for 'never' and '0'."""
    text = text.strip().lower()
    if text == "never" or text == "0":
        return None
    total, position = 0, 0
    while position < len(text):
        match = DURATION_TERM.match(text, position)
        if not match or match.group(2) not in DURATION_UNITS:
            raise ValueError("invalid duration '%s': use %s" % (text, DURATION_FORMS))
        total += int(match.group(1)) * DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0 or total == 0:
        raise ValueError("invalid duration '%s': use %s" % (text, DURATION_FORMS))
    if total > LATEST_EXPIRY:
        raise ValueError("duration '%s' is too long; use 'never' for a token that does not expire"
                         % text)
    return total


U32_MAX = 2 ** 32 - 1



# ---- Logging: one line per event on stderr, level from ZEUSD_LOG, client text escaped ----

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "warn": logging.WARNING, "error": logging.ERROR}


def shown(text, limit=64):
    """text cut to at most limit characters ("..." at the end when cut): how a message quotes
    what a client, a device or a command sent."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def escape_unprintable(text):
    """text with every non-printable character (controls, line and paragraph separators,
    format characters such as bidi overrides and zero-width spaces) as a \\xNN, \\uNNNN or
    \\UNNNNNNNN escape, so that it stays on one line and reads as it is."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else escape_character(char) for char in text)


def escape_character(char):
    code = ord(char)
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code if code < 0x10000 else \
        "\\U%08x" % code


class LineStyle:
    """How a log line looks: `time LEVEL message`, or, when stderr is the journal (systemd sets
    JOURNAL_STREAM to its device and inode), `<priority>message`, the journal adding the time.
    The message is escaped so that nothing in it can start a new line."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def __init__(self):
        self.journal = False
        self.second = None
        self.second_text = ""

    def detect_journal(self):
        device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
        try:
            info = os.fstat(2)
            self.journal = (info.st_dev, info.st_ino) == (int(device), int(inode))
        except (OSError, ValueError):
            self.journal = False

    def line(self, level, level_name, message):
        return self.prefix(level, level_name, time.time()) + escape_unprintable(message)

    def prefix(self, level, level_name, now):
        """What comes before the message: `<priority>`, or the time and the level.
        (RequestLines.write makes the same prefix for INFO itself, on its hot path.)"""
        if self.journal:
            return "<%d>" % self.PRIORITIES.get(level, 6)
        second = int(now)
        if second != self.second:
            self.second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self.second = second
        return "%s,%03d %s " % (self.second_text, (now - second) * 1000, level_name)


LINE_STYLE = LineStyle()


class LineFormatter(logging.Formatter):
    """Formats records in the LINE_STYLE."""

    def format(self, record):
        line = LINE_STYLE.line(record.levelno, record.levelname, record.getMessage())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging():
    level_name = os.environ.get("ZEUSD_LOG", "info").strip().lower()
    LINE_STYLE.detect_journal()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    log.addHandler(handler)
    log.setLevel(LOG_LEVELS.get(level_name, logging.INFO))
    log.propagate = False
    if level_name not in LOG_LEVELS:
        log.warning("ZEUSD_LOG=%r is not one of debug, info, warning, error; using info",
                    level_name)


def flush_logs():
    for handler in log.handlers:
        handler.flush()


def audit(failed, message, *args):
    """An audit line: who changed the hardware, how, and the outcome. It is INFO (ERROR when
    the device failed) and kept at ZEUSD_LOG=warning too: it is the record of the node."""
    level = logging.ERROR if failed else logging.INFO
    if failed or log.isEnabledFor(logging.WARNING):
        log.handle(log.makeRecord(log.name, level, "(audit)", 0, "audit: " + message, args,
                                  None))


def write_line(line):
    """Write a log line (text, or bytes that end with a newline) straight to stderr: nothing
    buffered, nothing lost at exit."""
    data = (line + "\n").encode("utf-8", "replace") if isinstance(line, str) else line
    while data:
        data = data[os.write(2, data):]


class RequestLines:
    """The per-request INFO lines, written in one os.write each (the logging module's path
    costs several times more), at most 100 a second: past that they are counted by status and
    summarised in one line a second later, so that a flood of requests cannot push the audit
    lines, warnings and errors past journald's rate limit. The caller checks that INFO is on
    and asks admit() before it formats the text, and escapes what a client sent in it."""

    PER_SECOND = 100

    def __init__(self):
        self.lock = threading.Lock()
        self.window_end = 0.0  # time.monotonic() when this second's allowance of lines renews
        self.written = 0  # in this second; counted without a lock, so a race may let one more by
        # the statuses of the lines left out: appended (atomic) without a lock, and only
        # summarise takes them out, from the front
        self.left_out = []
        self.summary_due = False

    def admit(self, status, now):
        """Whether a line may be written now (now: time.monotonic()); if not, it is counted."""
        if now >= self.window_end:
            self.window_end, self.written = now + 1.0, 0
        self.written += 1
        if self.written <= self.PER_SECOND:
            return True
        self.left_out.append(status)
        if not self.summary_due:
            self.schedule_summary()
        return False

    def write(self, status, text):
        if self.admit(status, time.monotonic()):
            self.emit(text)

    def emit(self, text):
        """Write one admitted line (text: anything whose str is the line)."""
        now = time.time()
        second = int(now)
        style = LINE_STYLE  # LineStyle.prefix for INFO, inlined: keep the two alike
        if style.journal:
            line = "<6>%s\n" % text
        else:
            if second != style.second:
                style.prefix(logging.INFO, "INFO", now)
            line = "%s,%03d INFO %s\n" % (style.second_text, (now - second) * 1000, text)
        data = line.encode("utf-8", "replace")
        written = os.write(2, data)
        if written < len(data):
            write_line(data[written:])

    def schedule_summary(self):
        with self.lock:
            if not self.summary_due:
                self.summary_due = True
                summary = threading.Timer(1.0, self.summarise)
                summary.daemon = True
                summary.start()

    def summarise(self):
        """One line for the lines left out so far. The flag is cleared first: a line left out
        after that schedules the next summary, and one left out before it is taken here."""
        self.summary_due = False
        left_out = self.left_out
        count = len(left_out)
        if not count:
            return
        statuses = collections.Counter(left_out[:count])
        del left_out[:count]
        write_line(LINE_STYLE.line(logging.INFO, "INFO", "%d request lines left out (over %d a "
                                   "second), by status: %s" % (
                                       count, self.PER_SECOND,
                                       ", ".join("%d: %d" % item for item in
                                                 sorted(statuses.items())))))


REQUEST_LINES = RequestLines()


# ---- Errors: how the startup or a device operation fails ----

class StartupError(Exception):
    """A reason the daemon cannot start; main prints it and exits 1."""


class DeviceError(Exception):
    """A device operation that failed. kind says how, for the API to map to a status:
    invalid-argument, not-supported, no-permission, conflict (another owner holds the GPU),
    busy, full (the node's hold record), timeout or failed."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind
        self.message = message


class ReadErrors:
    """Failed device reads (an error from the device, or no answer in time), counted by kind
    ("gpu", "cpu") and device for /metrics."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()

    def count(self, kind, device):
        with self.lock:
            self.counts[kind, device] += 1

    def items(self):
        with self.lock:
            return sorted(self.counts.items())


READ_ERRORS = ReadErrors()



# ---- Files: the small regular files the daemon reads, opened without blocking ----

MAX_FILE_BYTES = 65536


def read_small_file(path, limit=MAX_FILE_BYTES):
    """(bytes, os.stat_result) of a regular file of at most limit bytes (64 KiB: the files an
    admin writes). The checks are made on the opened descriptor, opened without blocking, so
    that a FIFO, a device such as /dev/zero or a file swapped in after a check is refused
    (OSError) rather than read or waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, "larger than %d bytes" % limit)
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                return b"".join(chunks), info
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, "larger than %d bytes" % limit)
    finally:
        os.close(fd)


# ---- TOML subset: the admin's TOML files (overrides, policy), read as tomllib reads them ----

TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
TOML_INTEGER = re.compile(r"[+-]?(?:0|[1-9](?:_?[0-9])*)(?![0-9A-Za-z_.:+-])")
TOML_BOOLEAN = re.compile(r"(true|false)(?![0-9A-Za-z_.:+-])")
TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
TOML_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
TOML_MAX_DEPTH = 32


class TomlReader:
    """Reads, as tomllib does, the TOML an override or policy file uses: [table] and dotted
    [table.name] headers, bare keys, basic and literal strings, integers, booleans, arrays
    (over several lines too) and comments. Anything else is a ValueError naming the line.
    `lines` maps each table's dotted name, and each "table.key", to its line."""

    def __init__(self, text):
        self.text = text.replace("\r\n", "\n")
        self.pos = 0
        self.depth = 0
        self.lines = {}

    def line(self):
        return self.text.count("\n", 0, self.pos) + 1

    def fail(self, message):
        raise ValueError("line %d: %s" % (self.line(), message))

    def peek(self, count=1):
        return self.text[self.pos:self.pos + count]

    def document(self):
        """{table name: {key: value}}, a dotted header's tables nested as tomllib nests them."""
        tables, current, defined = {}, None, set()
        while True:
            self.skip(newlines=True)
            if self.pos >= len(self.text):
                return tables
            if self.peek() == "[":
                self.pos += 1
                self.skip()
                names = [self.key()]
                while self.peek() == ".":
                    if len(names) >= TOML_MAX_DEPTH:
                        self.fail("tables nested deeper than %d levels" % TOML_MAX_DEPTH)
                    self.pos += 1
                    names.append(self.key())
                self.skip()
                self.expect("]")
                dotted = ".".join(names)
                if dotted in defined:
                    self.fail("table [%s] is defined twice" % dotted)
                defined.add(dotted)
                for end in range(1, len(names)):
                    self.lines.setdefault(".".join(names[:end]), self.line())
                self.lines[dotted] = self.line()
                current = tables
                for name in names:
                    current = current.setdefault(name, {})
                    if not isinstance(current, dict):
                        self.fail("[%s] names a key, not a table" % dotted)
            else:
                if current is None:
                    self.fail("a key outside any [table]")
                name = self.key()
                self.skip()
                self.expect("=")
                self.skip()
                self.lines["%s.%s" % (dotted, name)] = self.line()
                value = self.value()
                if name in current:
                    self.fail("key '%s' is given twice" % name)
                current[name] = value
            self.skip()
            if self.pos < len(self.text):
                self.expect("\n")

    def skip(self, newlines=False):
        """Skip spaces, tabs and a comment (and newlines, blank lines and comments if asked)."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#":
                end = self.text.find("\n", self.pos)
                end = len(self.text) if end < 0 else end
                if TOML_CONTROL.search(self.text, self.pos, end):
                    self.fail("a control character in a comment")
                self.pos = end
            else:
                return

    def expect(self, token):
        if self.peek(len(token)) != token:
            self.fail("expected %r" % token)
        self.pos += len(token)

    def key(self):
        match = TOML_BARE_KEY.match(self.text, self.pos)
        if not match:
            self.fail("expected a bare key (letters, digits, '_' and '-'); quoted and dotted "
                      "keys are not supported here")
        self.pos = match.end()
        return match.group()

    def value(self):
        char = self.peek()
        if self.peek(3) in ('"""', "'''"):
            self.fail("multi-line strings are not supported here")
        if char == '"':
            return self.basic_string()
        if char == "'":
            return self.literal_string()
        if char == "[":
            return self.array()
        for pattern, convert in ((TOML_BOOLEAN, lambda text: text == "true"),
                                 (TOML_INTEGER, lambda text: int(text.replace("_", "")))):
            match = pattern.match(self.text, self.pos)
            if match:
                self.pos = match.end()
                return convert(match.group())
        self.fail("expected a string, an integer, a boolean or an array")

    def literal_string(self):
        end = self.text.find("'", self.pos + 1)
        newline = self.text.find("\n", self.pos + 1)
        if end < 0 or 0 <= newline < end:
            self.fail("unterminated string")
        text = self.text[self.pos + 1:end]
        if TOML_CONTROL.search(text):
            self.fail("a control character in a string")
        self.pos = end + 1
        return text

    def basic_string(self):
        self.pos += 1
        parts = []
        while True:
            char = self.peek()
            if not char or char == "\n":
                self.fail("unterminated string")
            self.pos += 1
            if char == '"':
                return "".join(parts)
            if char == "\\":
                parts.append(self.escape())
            elif TOML_CONTROL.match(char):
                self.fail("a control character in a string")
            else:
                parts.append(char)

    def escape(self):
        char = self.peek()
        if char in TOML_ESCAPES:
            self.pos += 1
            return TOML_ESCAPES[char]
        digits = {"u": 4, "U": 8}.get(char)
        code = self.text[self.pos + 1:self.pos + 1 + (digits or 0)]
        if digits and re.fullmatch(r"[0-9A-Fa-f]{%d}" % digits, code):
            value = int(code, 16)
            if value <= 0x10FFFF and not 0xD800 <= value <= 0xDFFF:
                self.pos += 1 + digits
                return chr(value)
        self.fail("invalid escape sequence in a string")

    def array(self):
        self.depth += 1
        if self.depth > TOML_MAX_DEPTH:
            self.fail("arrays nested deeper than %d levels" % TOML_MAX_DEPTH)
        self.pos += 1
        items = []
        while True:
            self.skip(newlines=True)
            if self.peek() == "]":
                self.pos += 1
                self.depth -= 1
                return items
            items.append(self.value())
            self.skip(newlines=True)
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                self.fail("expected ',' or ']' in an array")


def read_trusted_toml(path, flag, refusal):
    """A TomlReader of a file the daemon trusts as the admin's: a regular
    file of at most 64 KiB owned by root or the daemon's user and not writable by everyone
    (by its group: a warning); StartupError naming flag and path, with refusal, otherwise."""
    try:
        data, info = read_small_file(path)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise StartupError("cannot read %s %s: %s" % (flag, path,
                                                     getattr(err, "strerror", None) or err))
    if info.st_uid not in (0, os.geteuid()):
        raise StartupError("%s %s is owned by uid %d, neither root nor the daemon's user: "
                           "refusing %s" % (flag, path, info.st_uid, refusal))
    if info.st_mode & 0o002:
        raise StartupError("%s %s is writable by everyone (mode %03o): refusing %s; run: "
                           "chmod o-w %s" % (flag, path, info.st_mode & 0o777, refusal, path))
    if info.st_mode & 0o020:
        log.warning("%s %s is writable by its group (mode %03o); the daemon trusts what it "
                    "says", flag, path, info.st_mode & 0o777)
    return TomlReader(text)



# ---- Processes: start times, login sessions, owners and Slurm jobs in /proc ----

UNSEEN_SESSION = [0, 0]  # the session of a caller the daemon cannot see (another PID namespace)
MAX_ANCESTORS = 4096  # how far up session_of climbs (pids get reused while it climbs)
CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", 7)  # Linux's; time has the name from 3.7
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    """The fields of /proc/<pid>/stat after the command name, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat_file:
            return stat_file.read().rpartition(b")")[2].split()
    except OSError:
        return None


def process_start(pid):
    """The start time of a live process (clock ticks since boot), or None (for a process that
    has exited too, while it waits to be reaped)."""
    fields = stat_fields(pid)
    if not fields or len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def boot_ticks():
    """Now, in the clock ticks since boot that /proc/<pid>/stat gives start times in."""
    return int(time.clock_gettime(CLOCK_BOOTTIME) * CLOCK_TICKS)


def session_of(pid, connected=None):
    """[leader pid, leader start time] of a process's login session. The start time tells a
    session from a later one whose leader got the same pid. A session begun outside the
    daemon's PID namespace (its id reads 0 here, `nsenter`, `docker exec`) is led by the process
    that entered the namespace: the caller's topmost ancestor here. UNSEEN_SESSION for a
    caller outside the namespace (pid 0); an ended session for one already gone, or for a
    process that started after its connection did (connected, in boot_ticks(): it got the
    caller's pid since, and is not the caller)."""
    if not pid:
        return list(UNSEEN_SESSION)
    fields = stat_fields(pid)
    if not fields or len(fields) < 20 or connected is not None and (
            fields[0] in (b"Z", b"X") or int(fields[19]) > connected):
        return [pid, 0]
    leader = int(fields[3])
    if leader == 0:
        leader = pid
        for _ in range(MAX_ANCESTORS):
            parent = stat_fields(leader)
            if not parent or int(parent[1]) == 0:
                break
            leader = int(parent[1])
    return [leader, process_start(leader) or 0]


def alive(process):
    """Whether a [pid, start time] pair is a process still running; an unseen session always
    is (its end cannot be seen: only a release or the daemon's stop ends its holds)."""
    if process == UNSEEN_SESSION:
        return True
    return bool(process[1]) and process_start(process[0]) == process[1]


CAP_SYS_PTRACE = 19


def hidden_processes():
    """Why this daemon cannot see its clients' processes in /proc, or None: /proc mounted with
    hidepid (systemd's ProtectProc=invisible or noaccess does that), the daemon neither in the
    mount's gid= group nor holding CAP_SYS_PTRACE."""
    options = []
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/proc":  # the last one is on top
                    options = line.rpartition(" - ")[2].split()[-1].split(",")
        with open("/proc/self/status") as status:
            effective = next(int(line.split()[1], 16) for line in status
                             if line.startswith("CapEff:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    settings = dict(option.partition("=")[::2] for option in options)
    hidepid = settings.get("hidepid", "0")
    exempt = settings.get("gid") in set(str(gid) for gid in os.getgroups() + [os.getegid()])
    if hidepid in ("0", "off") or exempt or effective >> CAP_SYS_PTRACE & 1:
        return None
    return "/proc is mounted with hidepid=%s and the daemon lacks CAP_SYS_PTRACE" % hidepid


def check_process_visibility():
    """Exit 1 when the daemon cannot see its clients' sessions, which every hold needs."""
    hidden = hidden_processes()
    if hidden is not None:
        raise StartupError("%s: it cannot see its clients' sessions, so every GPU hold would "
                           "be restored as soon as it is made. Give the daemon CAP_SYS_PTRACE "
                           "(systemd: a drop-in with [Service] CapabilityBoundingSet="
                           "CAP_SYS_PTRACE, added to the unit's set), or mount /proc without "
                           "hidepid, or pass --no-restore" % hidden)


def process_uid(pid):
    """The real uid of a process, from /proc/<pid>/status; None where the daemon cannot see
    it."""
    try:
        with open("/proc/%d/status" % pid, "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# a Slurm job's cgroup, as slurmd makes it (v2: under system.slice; v1: /slurm/uid_N/): a user's
# delegated subtree (user@UID.service) cannot name one
SLURM_JOB = re.compile(r"^(?:/system\.slice/(?:[^/]*_)?slurmstepd\.scope|/slurm(?:_[^/]*)?/uid_"
                       r"[0-9]+)/job_([0-9]{1,20})(?=/|$)")


def slurm_job_of(pid):
    """The Slurm job id (digits) of a process in a Slurm job's cgroup (v1 or v2, as slurmd
    makes them), or None."""
    try:
        with open("/proc/%d/cgroup" % pid, "rb") as cgroups:
            lines = cgroups.read(MAX_FILE_BYTES).decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in lines:
        match = SLURM_JOB.search(line.split(":", 2)[-1])
        if match:
            return match.group(1)
    return None



# ==== Device core: GPUs, CPUs, control, holds, sampling; it knows nothing of HTTP ====

# ---- Devices, GPUs: the backend interface and its NVML implementation ----

GpuInfo = collections.namedtuple("GpuInfo", "name pci_address cumulative_energy_available uuid "
                                            "power_limit_range")
NVML_CALL_LIMIT_S = 10.0  # how long a control call may take before its caller is told it is late
NVML_KINDS = {2: "invalid-argument", 3: "not-supported", 4: "no-permission"}
NVML_ABSENT = (9, 12)  # driver not loaded, library not found
NVML_NOT_SUPPORTED = 3
NVML_VALUE_FIELDS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
FIELD_STATUS = struct.Struct("=II")  # nvmlFieldValue_t's valueType and nvmlReturn
# by valueType: double, unsigned int, unsigned long (C's, 8 bytes on 64-bit Linux), unsigned
# long long, long long, int, unsigned short
FIELD_VALUES = tuple(struct.Struct("=" + code) for code in "dI%sQqiH" % (
    "Q" if ctypes.sizeof(ctypes.c_ulong) == 8 else "L"))


class GpuBackend:
    """The GPU operations the daemon uses, by index into `gpus`. This base has no GPUs."""

    gpus = ()

    def limit_s(self, operation):
        """How long the control operation may take before its caller is told it is late."""
        return NVML_CALL_LIMIT_S

    def power_mw(self, index):
        raise NotImplementedError

    def energy_mj(self, index):
        raise NotImplementedError

    def power_limit_mw(self, index):
        raise NotImplementedError

    def power_limit_constraints_mw(self, index):
        raise NotImplementedError

    def persistence_mode(self, index):
        raise NotImplementedError

    def process_ids(self, index):
        """The pids of the processes running on the GPU (compute and graphics)."""
        raise DeviceError("not-supported", "GPU %d's processes cannot be listed" % index)

    def set_power_limit(self, index, milliwatts):
        raise NotImplementedError

    def set_persistence_mode(self, index, enabled):
        raise NotImplementedError

    def set_gpu_locked_clocks(self, index, min_mhz, max_mhz):
        raise NotImplementedError

    def reset_gpu_locked_clocks(self, index):
        raise NotImplementedError

    def set_mem_locked_clocks(self, index, min_mhz, max_mhz):
        raise NotImplementedError

    def reset_mem_locked_clocks(self, index):
        raise NotImplementedError

    def reset_locked_clocks(self, index):
        """Reset both the GPU and the memory locked clocks, in that order."""
        self.reset_gpu_locked_clocks(index)
        self.reset_mem_locked_clocks(index)


def text_of(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def lspci_address(bus_id):
    """NVML's bus id (00000000:00:06.0) as `lspci -D` prints it (0000:00:06.0)."""
    domain, _, rest = text_of(bus_id).partition(":")
    try:
        return "%04x:%s" % (int(domain, 16), rest.lower())
    except ValueError:
        return text_of(bus_id).lower()


class NvmlBackend(GpuBackend):
    """NVIDIA GPUs through pynvml, in NVML index order."""

    def __init__(self, nvml):
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i)
                        for i in range(nvml.nvmlDeviceGetCount())]
        self.instant_field = [getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", 186)]
        self.instant = [True] * len(self.handles)
        self.field_reads = [self._field_read(handle) for handle in self.handles]
        gpus = []
        for index, handle in enumerate(self.handles):
            name = text_of(nvml.nvmlDeviceGetName(handle))
            pci = lspci_address(nvml.nvmlDeviceGetPciInfo(handle).busId)
            try:
                uuid = text_of(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError:
                uuid = ""
            try:
                limits = tuple(nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle))
            except nvml.NVMLError:
                limits = None
            gpus.append(GpuInfo(name, pci, self._answers(nvml.nvmlDeviceGetTotalEnergyConsumption,
                                                         handle), uuid, limits))
            self.instant[index] = self._instant_code(handle) != NVML_NOT_SUPPORTED
        self.gpus = gpus

    def _answers(self, function, handle):
        try:
            function(handle)
            return True
        except self.nvml.NVMLError:
            return False

    def _instant_code(self, handle):
        return self.nvml.nvmlDeviceGetFieldValues(handle, self.instant_field)[0].nvmlReturn

    def _field_read(self, handle):
        """A function that reads the GPU's instant power field: (the field's status, its value).
        With the real binding it is one call into the loaded library with a field value
        allocated once, read back with struct (pynvml builds the array and looks the function
        up on every call, and its structures' attributes go through Python code); otherwise, or
        when NVML calls are timed, pynvml's own function."""
        nvml, field = self.nvml, self.instant_field
        try:
            if not isinstance(nvml, type(sys)):
                raise TypeError("NVML calls are timed")
            function = nvml._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")
            layout = nvml.c_nvmlFieldValue_t
            values = (layout * 1)()
            status_at, value_at = layout.valueType.offset, layout.value.offset
            if layout.nvmlReturn.offset != status_at + 4:
                raise TypeError("an unexpected nvmlFieldValue_t layout")
        except (AttributeError, TypeError, nvml.NVMLError):
            def read():
                value = nvml.nvmlDeviceGetFieldValues(handle, field)[0]
                return value.nvmlReturn, getattr(value.value, NVML_VALUE_FIELDS[value.valueType])
            return read
        values[0].fieldId = field[0]
        count, pointer, error = ctypes.c_int32(1), ctypes.byref(values), nvml.NVMLError
        status, unpackers = FIELD_STATUS.unpack_from, FIELD_VALUES

        def read():
            code = function(handle, count, pointer)
            if code:
                raise error(code)
            value_type, code = status(values, status_at)
            if code:
                return code, None
            return 0, unpackers[value_type].unpack_from(values, value_at)[0]
        return read

    def _call(self, function, index, *args):
        try:
            return function(self.handles[index], *args)
        except self.nvml.NVMLError as err:
            raise self._error(function.__name__, index, err)

    def _read(self, function, index):
        try:
            return function(self.handles[index])
        except self.nvml.NVMLError as err:
            READ_ERRORS.count("gpu", index)
            raise self._error(function.__name__, index, err)

    @staticmethod
    def _error(function_name, index, err):
        code = getattr(err, "value", None)
        return DeviceError(NVML_KINDS.get(code, "failed"), "%s failed on GPU %d: %s (NVML error "
                           "%s)" % (function_name, index, err, code))

    def power_mw(self, index):
        """Instant power, or nvmlDeviceGetPowerUsage where the GPU does not report it. This is
        the sampling hot path, so the field read is inlined rather than going through _call."""
        if self.instant[index]:
            try:
                code, value = self.field_reads[index]()
            except self.nvml.NVMLError as err:
                READ_ERRORS.count("gpu", index)
                raise self._error("nvmlDeviceGetFieldValues", index, err)
            if code == 0:
                return int(value)
            if code != NVML_NOT_SUPPORTED:
                READ_ERRORS.count("gpu", index)
                raise DeviceError(NVML_KINDS.get(code, "failed"), "instant power read failed on "
                                  "GPU %d: %s (NVML error %d)" % (index, self.nvml.NVMLError(code),
                                                                  code))
            self.instant[index] = False
            log.info("GPU %d does not report instant power; using nvmlDeviceGetPowerUsage", index)
        return self._read(self.nvml.nvmlDeviceGetPowerUsage, index)

    def energy_mj(self, index):
        if not self.gpus[index].cumulative_energy_available:
            raise DeviceError("not-supported", "GPU %d has no cumulative energy counter (nvmlDevice"
                              "GetTotalEnergyConsumption is not supported)" % index)
        return self._read(self.nvml.nvmlDeviceGetTotalEnergyConsumption, index)

    def power_limit_mw(self, index):
        return self._read(self.nvml.nvmlDeviceGetPowerManagementLimit, index)

    def power_limit_constraints_mw(self, index):
        return tuple(self._read(self.nvml.nvmlDeviceGetPowerManagementLimitConstraints, index))

    def persistence_mode(self, index):
        return self._read(self.nvml.nvmlDeviceGetPersistenceMode, index) == 1

    def process_ids(self, index):
        pids = set()
        for name in ("nvmlDeviceGetComputeRunningProcesses",
                     "nvmlDeviceGetGraphicsRunningProcesses"):
            function = getattr(self.nvml, name, None)
            if function is None:
                raise DeviceError("not-supported", "this pynvml has no %s" % name)
            pids.update(process.pid for process in self._read(function, index))
        return sorted(pids)

    def set_power_limit(self, index, milliwatts):
        self._call(self.nvml.nvmlDeviceSetPowerManagementLimit, index, milliwatts)

    def set_persistence_mode(self, index, enabled):
        self._call(self.nvml.nvmlDeviceSetPersistenceMode, index, 1 if enabled else 0)

    def set_gpu_locked_clocks(self, index, min_mhz, max_mhz):
        self._call(self.nvml.nvmlDeviceSetGpuLockedClocks, index, min_mhz, max_mhz)

    def reset_gpu_locked_clocks(self, index):
        self._call(self.nvml.nvmlDeviceResetGpuLockedClocks, index)

    def set_mem_locked_clocks(self, index, min_mhz, max_mhz):
        self._call(self.nvml.nvmlDeviceSetMemoryLockedClocks, index, min_mhz, max_mhz)

    def reset_mem_locked_clocks(self, index):
        self._call(self.nvml.nvmlDeviceResetMemoryLockedClocks, index)


class TimedLibrary:
    """A device library whose calls are logged at DEBUG with their duration (only used when
    ZEUSD_LOG=debug, so that the normal path pays nothing)."""

    def __init__(self, library):
        self.library = library

    def __getattr__(self, name):
        value = getattr(self.library, name)
        if not name.startswith("nvml") or not callable(value):
            return value

        def timed(*args):
            started = time.perf_counter()
            try:
                return value(*args)
            finally:
                log.debug("%s: %.1f us", name, (time.perf_counter() - started) * 1e6)
        timed.__name__ = name
        return timed


def open_gpu_backend():
    """(NVML's GPUs, None); (a backend without GPUs, why) where pynvml or the driver is absent,
    the reason also logged as a warning."""
    try:
        import pynvml
    except ImportError:
        return no_gpus("pynvml is not installed (pip install nvidia-ml-py): serving zero GPUs")
    try:
        return NvmlBackend(TimedLibrary(pynvml) if log.isEnabledFor(logging.DEBUG) else pynvml), \
            None
    except pynvml.NVMLError as err:
        if getattr(err, "value", None) in NVML_ABSENT:
            return no_gpus("NVML is not available (%s): serving zero GPUs" % err)
        raise StartupError("cannot initialise NVML: %s" % err)
    except Exception as err:
        raise StartupError("cannot initialise NVML: %s: %s" % (type(err).__name__, err))


def no_gpus(problem):
    log.warning("%s", problem)
    return GpuBackend(), problem


# ---- GPU command overrides: configured commands in place of NVML control calls ----

OVERRIDE_ARGUMENTS = {  # operation -> its placeholders besides {gpu_id}
    "set_power_limit": ("power_limit_mw", "power_limit_w"),
    "set_persistence_mode": ("enabled",),
    "set_gpu_locked_clocks": ("min_clock_mhz", "max_clock_mhz"),
    "reset_gpu_locked_clocks": (),
    "set_mem_locked_clocks": ("min_clock_mhz", "max_clock_mhz"),
    "reset_mem_locked_clocks": (),
    "reset_locked_clocks": (),
}
OVERRIDE_KEYS = ("commands", "error_pattern", "timeout_s")
OVERRIDE_TIMEOUT_S = 60
OVERRIDE_LIMIT_GRACE_S = 2
OUTPUT_KEPT = 65536  # bytes of each of stdout and stderr kept
EXIT_GRACE_S = 1.0  # how long pipes held open by a command's children are read after it exits
EXIT_CHECK_S = 0.1
PATTERN_LIMIT_S = 1.0  # how long matching error_pattern may take
PATTERN_START_S = 5.0  # how long the matching child may take to start, on a busy node
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
OUTPUT_SHOWN = 300


class CommandOverride:
    """The commands that replace one control operation, run in order without a shell."""

    def __init__(self, operation, commands, error_pattern, timeout_s):
        self.operation = operation
        self.commands = commands  # each a list of words, placeholders still in them
        self.error_pattern = error_pattern
        self.timeout_s = timeout_s

    def run(self, index, arguments):
        """Run every command for GPU index; DeviceError at the first that fails."""
        values = dict(arguments, gpu_id=index)
        for words in self.commands:
            argv = [PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), word)
                    for word in words]
            run_command(argv, self.timeout_s, self.error_pattern)


def run_command(argv, timeout_s, error_pattern):
    """Run argv (stdin closed, no shell); DeviceError if it exits non-zero, outlives timeout_s
    (it, its process group and whatever still holds its output are killed) or prints what
    error_pattern matches. At most 64 KiB of each of stdout and stderr is kept."""
    shown_command = " ".join(shlex.quote(word) for word in argv)
    log.debug("running %s", shown_command)
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except OSError as err:
        raise DeviceError("failed", "command '%s' could not be started: %s"
                          % (shown_command, err.strerror or err))
    reason = None
    try:
        deadline = time.monotonic() + timeout_s
        out, err = collect_output(process, deadline)
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_command(process)
            reason = "did not finish within %d s and was killed" % timeout_s
    finally:
        process.stdout.close()
        process.stderr.close()
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    if reason is None and process.returncode != 0:
        reason = ("exited with status %d" % process.returncode if process.returncode > 0 else
                  "was killed by signal %d" % -process.returncode)
    if reason is None and error_pattern is not None:
        matched = pattern_matches(error_pattern, out + "\n" + err)
        if matched is None:
            reason = "printed output that error_pattern %r could not be matched against within " \
                     "%g s" % (error_pattern.pattern, PATTERN_LIMIT_S)
        elif matched:
            reason = "printed output matching error_pattern %r" % error_pattern.pattern
    if reason is not None:
        raise DeviceError("failed", "command '%s' %s; stdout: %s; stderr: %s" % (
            shown_command, reason, shown(out.strip(), OUTPUT_SHOWN),
            shown(err.strip(), OUTPUT_SHOWN)))


def collect_output(process, deadline):
    """(stdout, stderr) of a running command, each pipe read until it closes and its first
    64 KiB kept (the rest is read and discarded), until the deadline. Once the command itself
    has exited, pipes that a child of it keeps open are read for at most a second more."""
    kept = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    poller = select.poll()
    for fd in kept:
        poller.register(fd, select.POLLIN)
    open_fds, exited_at = set(kept), None
    while open_fds:
        now = time.monotonic()
        if exited_at is None and process.poll() is not None:
            exited_at = now
        until = deadline if exited_at is None else min(deadline, exited_at + EXIT_GRACE_S)
        if now >= until:
            break
        for fd, _ in poller.poll(min(until - now, EXIT_CHECK_S) * 1000):
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
            elif len(kept[fd]) < OUTPUT_KEPT:
                kept[fd] += chunk[:OUTPUT_KEPT - len(kept[fd])]
    return bytes(kept[process.stdout.fileno()]), bytes(kept[process.stderr.fileno()])


def kill_command(process):
    """SIGKILL a command's process group, and every other process that holds its output pipes
    (a child that left the group with setsid but kept them), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass
    pipes = {"pipe:[%d]" % os.fstat(pipe.fileno()).st_ino
             for pipe in (process.stdout, process.stderr)}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        fd_dir = "/proc/%s/fd" % pid
        try:
            if any(os.readlink(os.path.join(fd_dir, fd)) in pipes for fd in os.listdir(fd_dir)):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue
    process.wait()


PATTERN_MATCHER = (
    "import json, re, signal, sys\n"
    "pattern, text = json.loads(sys.stdin.buffer.read().decode('utf-8'))\n"
    "signal.setitimer(signal.ITIMER_REAL, %r)\n"
    "sys.exit(0 if re.search(pattern, text) else 1)\n")


def pattern_matches(pattern, text):
    """Whether pattern matches text, None if that cannot be decided within 1 s. The search runs
    in a child Python that SIGALRM ends after 1 s: Python's re holds the interpreter lock while
    it backtracks, so a pattern such as (a|aa)+$ would otherwise stall every daemon thread."""
    process = subprocess.Popen(
        [sys.executable or "python3", "-I", "-S", "-c", PATTERN_MATCHER % PATTERN_LIMIT_S],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.communicate(json.dumps([pattern.pattern, text]).encode("utf-8"),
                            timeout=PATTERN_LIMIT_S + PATTERN_START_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return {0: True, 1: False}.get(process.returncode)


def load_overrides(path):
    """{operation: CommandOverride} from a trusted override file; StartupError otherwise."""
    reader = read_trusted_toml(path, "--gpu-command-overrides", "to run the commands it names")
    try:
        tables = reader.document()
    except ValueError as err:
        raise StartupError("--gpu-command-overrides %s: %s" % (path, err))
    return {operation: parse_override(path, operation, table)
            for operation, table in tables.items()}


def parse_override(path, operation, table):
    def fail(problem):
        raise StartupError("--gpu-command-overrides %s: [%s] %s" % (path, operation, problem))
    if operation not in OVERRIDE_ARGUMENTS:
        fail("is not an operation; choose from %s" % ", ".join(OVERRIDE_ARGUMENTS))
    unknown = [key for key in table if key not in OVERRIDE_KEYS]
    if unknown:
        fail("has unknown key '%s'; the keys are %s" % (unknown[0], ", ".join(OVERRIDE_KEYS)))
    commands = table.get("commands")
    if not isinstance(commands, list) or not commands or \
            not all(isinstance(command, str) and command.strip() for command in commands):
        fail("needs 'commands', a non-empty array of non-empty strings")
    allowed = ("gpu_id",) + OVERRIDE_ARGUMENTS[operation]
    split = []
    for command in commands:
        try:
            words = shlex.split(command)
        except ValueError as err:
            fail("command %r cannot be split into words: %s" % (command, err))
        for name in PLACEHOLDER.findall(command):
            if name not in allowed:
                fail("command %r uses {%s}; this operation has %s" % (
                    command, name, ", ".join("{%s}" % a for a in allowed)))
        split.append(words)
    pattern = table.get("error_pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            fail("'error_pattern' must be a string")
        try:
            pattern = re.compile(pattern)
        except re.error as err:
            fail("'error_pattern' is not a valid regular expression: %s" % err)
    timeout_s = table.get("timeout_s", OVERRIDE_TIMEOUT_S)
    if type(timeout_s) is not int or timeout_s <= 0:
        fail("'timeout_s' must be a positive integer (seconds)")
    return CommandOverride(operation, split, pattern, timeout_s)


class OverriddenBackend(GpuBackend):
    """A GPU backend whose control operations run configured commands where an override names
    them, and the inner backend's otherwise; reads always go to the inner backend."""

    def __init__(self, inner, overrides):
        self.inner = inner
        self.overrides = overrides
        self.gpus = inner.gpus

    def limit_s(self, operation):
        override = self.overrides.get(operation)
        if override is None:
            return self.inner.limit_s(operation)
        return override.timeout_s * len(override.commands) + OVERRIDE_LIMIT_GRACE_S

    def power_mw(self, index):
        return self.inner.power_mw(index)

    def energy_mj(self, index):
        return self.inner.energy_mj(index)

    def power_limit_mw(self, index):
        return self.inner.power_limit_mw(index)

    def power_limit_constraints_mw(self, index):
        return self.inner.power_limit_constraints_mw(index)

    def persistence_mode(self, index):
        return self.inner.persistence_mode(index)

    def process_ids(self, index):
        return self.inner.process_ids(index)

    def apply(self, operation, index, args, **placeholders):
        """Run the operation's override with its placeholders, or the inner backend's call."""
        override = self.overrides.get(operation)
        if override is None:
            getattr(self.inner, operation)(index, *args)
        else:
            override.run(index, placeholders)

    def set_power_limit(self, index, milliwatts):
        self.apply("set_power_limit", index, (milliwatts,), power_limit_mw=milliwatts,
                   power_limit_w=milliwatts // 1000)

    def set_persistence_mode(self, index, enabled):
        self.apply("set_persistence_mode", index, (enabled,), enabled=1 if enabled else 0)

    def set_gpu_locked_clocks(self, index, min_mhz, max_mhz):
        self.apply("set_gpu_locked_clocks", index, (min_mhz, max_mhz), min_clock_mhz=min_mhz,
                   max_clock_mhz=max_mhz)

    def reset_gpu_locked_clocks(self, index):
        self.apply("reset_gpu_locked_clocks", index, ())

    def set_mem_locked_clocks(self, index, min_mhz, max_mhz):
        self.apply("set_mem_locked_clocks", index, (min_mhz, max_mhz), min_clock_mhz=min_mhz,
                   max_clock_mhz=max_mhz)

    def reset_mem_locked_clocks(self, index):
        self.apply("reset_mem_locked_clocks", index, ())

    def reset_locked_clocks(self, index):
        if "reset_locked_clocks" in self.overrides:
            self.apply("reset_locked_clocks", index, ())
        else:
            GpuBackend.reset_locked_clocks(self, index)



# ---- Devices, CPUs: RAPL zones, counters with wraparound, the wraparound guard ----

RAPL_ZONE = re.compile(r"intel-rapl:([0-9]+)")
DIGITS_UJ = re.compile(rb"[0-9]{1,20}")
RAPL_GUARD_INTERVAL_S = 30.0


def read_text(path):
    with open(path) as text_file:
        return text_file.read().strip()


class RaplCounter:
    """One energy_uj file, kept open, with its wraparound offset; callers hold the package lock.

    A read lower than the last by more than half of max_energy_range_uj is a wraparound (one
    range is added from then on); a smaller step back is a glitch, refused with an error and
    never a jump of a whole range. A file replaced under the same path (the powercap driver
    reloaded) is reopened, and its energy continues from where the old one stopped.
    """

    def __init__(self, zone_dir):
        self.path = os.path.join(zone_dir, "energy_uj")
        self.max_range = int(read_text(os.path.join(zone_dir, "max_energy_range_uj")))
        self.fd = None
        self.identity = None
        self.offset = 0
        self.last_raw = self.reopen()

    def reopen(self):
        """(Re)open the file; its current raw value."""
        fd = os.open(self.path, os.O_RDONLY)
        if self.fd is not None:
            os.close(self.fd)
        self.fd = fd
        info = os.fstat(fd)
        self.identity = (info.st_dev, info.st_ino)
        return self.read_raw()

    def read_raw(self):
        text = os.pread(self.fd, 32, 0).strip()
        if not DIGITS_UJ.fullmatch(text):
            raise ValueError("%s holds %r, not a number of microjoules" % (self.path, text[:32]))
        return int(text)

    def read(self):
        """Cumulative µJ: the raw value plus the range for each wrap seen (and, after a reopen,
        the energy counted before it)."""
        info = os.stat(self.path)
        if (info.st_dev, info.st_ino) != self.identity:
            before = self.last_raw + self.offset
            raw = self.reopen()
            self.offset, self.last_raw = before - raw, raw
            log.warning("%s was replaced (the powercap driver reloaded?); reopened it, energy "
                        "continues from %d uJ", self.path, before)
            return before
        raw = self.read_raw()
        if raw < self.last_raw:
            if self.last_raw - raw <= self.max_range // 2:
                raise ValueError("%s stepped back by %d uJ, less than half its range: a glitch, "
                                 "read ignored" % (self.path, self.last_raw - raw))
            self.offset += self.max_range
        self.last_raw = raw
        return raw + self.offset


class RaplPackage:
    """An intel-rapl:N zone (a CPU package, or psys) and its DRAM subzone, under one lock."""

    def __init__(self, index, name, package, dram):
        self.index = index
        self.name = name
        self.package = package
        self.dram = dram
        self.lock = threading.Lock()
        self.last_read = time.monotonic()

    def read(self):
        """(package µJ, DRAM µJ or None), wraparound-corrected."""
        with self.lock:
            self.last_read = time.monotonic()
            try:
                return self.package.read(), (self.dram.read() if self.dram else None)
            except (OSError, ValueError) as err:
                READ_ERRORS.count("cpu", self.index)
                raise DeviceError("failed", "CPU %d: cannot read RAPL energy: %s"
                                  % (self.index, err))


def discover_rapl(root):
    """Every intel-rapl:N zone directly under root, by N; unreadable ones skipped with a warning."""
    if not os.path.isdir(root):
        log.warning("no RAPL directory at %s: serving zero CPUs", root)
        return []
    packages = []
    for entry in os.listdir(root):
        match = RAPL_ZONE.fullmatch(entry)
        if not match:
            continue
        zone = os.path.join(root, entry)
        try:
            name = read_text(os.path.join(zone, "name"))
            counter = RaplCounter(zone)
        except (OSError, ValueError) as err:
            log.warning("skipping RAPL zone %s: %s", zone, err)
            continue
        packages.append(RaplPackage(int(match.group(1)), name, counter, find_dram(zone, entry)))
    return sorted(packages, key=lambda package: package.index)


def find_dram(zone, entry):
    """The counter of the zone's subzone named dram, or None."""
    for sub in sorted(os.listdir(zone)):
        sub_dir = os.path.join(zone, sub)
        if not sub.startswith(entry + ":") or not os.path.isdir(sub_dir):
            continue
        try:
            if read_text(os.path.join(sub_dir, "name")) == "dram":
                return RaplCounter(sub_dir)
        except (OSError, ValueError) as err:
            log.warning("skipping RAPL DRAM zone %s: %s", sub_dir, err)
    return None


class RaplWrapGuard:
    """Reads each RAPL counter that nobody read for 30 s, so that no wraparound goes unseen.
    A background worker: start() starts its thread, stop() ends it."""

    def __init__(self, packages):
        self.packages = packages
        self.stopped = threading.Event()

    def start(self):
        threading.Thread(target=self.run, name="rapl-guard", daemon=True).start()

    def stop(self):
        self.stopped.set()

    def run(self):
        while True:
            due = min(p.last_read for p in self.packages) + RAPL_GUARD_INTERVAL_S
            if self.stopped.wait(max(0.0, due - time.monotonic())):
                return
            now = time.monotonic()
            for package in self.packages:
                if now - package.last_read >= RAPL_GUARD_INTERVAL_S:
                    try:
                        package.read()
                    except DeviceError as err:
                        log.debug("wraparound guard: %s", err.message)


# ---- Bounded waits: device calls with a time limit, so that no caller waits on a hung device ----

READ_LIMIT_S = 5.0
GONE_CHECK_AFTER_S = 0.05
GONE_CHECK_EVERY_S = 0.1


class CallerGone(Exception):
    """The client went away while its request waited on a device."""


def wait_until(event, deadline, gone):
    """Wait for event until the monotonic deadline; whether it is set. After a short wait,
    gone() is asked every 0.1 s whether the client went away (CallerGone then)."""
    if event.wait(min(GONE_CHECK_AFTER_S, max(0.0, deadline - time.monotonic()))):
        return True
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return event.is_set()
        if gone is not None and gone():
            raise CallerGone()
        if event.wait(min(GONE_CHECK_EVERY_S, remaining)):
            return True


class PendingCall:
    """One device call in progress: its start, the caller making it (abandon: how to answer
    that caller's client from elsewhere should the call hang), and once done its value or
    error."""

    __slots__ = ("started", "abandon", "abandoned", "done", "value", "error")

    def __init__(self, abandon):
        self.started = time.monotonic()
        self.abandon = abandon
        self.abandoned = False
        self.done = threading.Event()
        self.value = None
        self.error = None


class BoundedCalls:
    """Device reads on request paths, with a time limit, READ_LIMIT_S from the call's start.

    The first caller makes the call on its own thread: the usual, quick call costs no hand-off
    to another thread. Callers that ask for the same call on the same device while it is
    pending join it rather than make it again, so a hung device ties up at most one thread per
    kind of call however many clients ask. A watchdog thread, awake only while calls are being
    made, gives up on a call older than the limit: it calls the maker's abandon(device, error),
    which answers that caller's client and frees its connection (the maker's thread is left to
    the device, and ends quietly if the call ever returns); joiners are answered `timeout`,
    and so is every caller from then on, at once, until the call returns. A background worker:
    start() starts the watchdog, stop() ends it.
    """

    def __init__(self, kind, limit_s=READ_LIMIT_S):
        self.kind = kind
        self.limit_s = limit_s
        self.lock = threading.Lock()
        self.activity = threading.Condition(self.lock)
        self.pending = {}  # (function name, device) -> PendingCall
        self.calls_made = 0
        self.watched = False  # whether the watchdog is awake
        self.stopped = False

    def call_all(self, function, ids, gone=None, abandon=None):
        """({device: value}, {device: DeviceError}) of function(device) for each of ids;
        CallerGone if the client went away meanwhile, or was answered by abandon()."""
        name = function.__name__
        results, errors = {}, {}
        for index in ids:
            key = (name, index)
            with self.lock:
                call = self.pending.get(key)
                making = call is None
                if making:
                    call = self.pending[key] = PendingCall(abandon)
                    self.calls_made += 1
                    if not self.watched:
                        self.watched = True
                        self.activity.notify()
            if making:
                self.make(key, function, call)
            elif not wait_until(call.done, call.started + self.limit_s, gone):
                errors[index] = self.timeout(key, call)
                continue
            if call.error is not None:
                errors[index] = call.error
            else:
                results[index] = call.value
        return results, errors

    def make(self, key, function, call):
        try:
            call.value = function(key[1])
        except DeviceError as err:
            call.error = err
        except Exception as err:
            call.error = DeviceError("failed", "%s %d: %s failed unexpectedly: %s: %s"
                                     % (self.kind, key[1], key[0], type(err).__name__, err))
        finally:
            with self.lock:
                del self.pending[key]
            call.done.set()
        if call.abandoned and call.abandon is not None:
            raise CallerGone()

    def timeout(self, key, call):
        READ_ERRORS.count(self.kind.lower(), key[1])
        return DeviceError("timeout", "%s %d did not answer within %g s (its %s call has been "
                           "pending for %.1f s)" % (self.kind, key[1], self.limit_s, key[0],
                                                    time.monotonic() - call.started))

    def overdue(self):
        """{device: message} of the calls pending for longer than the limit."""
        now = time.monotonic()
        with self.lock:
            return {index: "%s %d has not answered its %s call for %.1f s" % (
                self.kind, index, name, now - call.started)
                for (name, index), call in self.pending.items()
                if now - call.started >= self.limit_s}

    def start(self):
        threading.Thread(target=self.watchdog, name="%s-calls-watchdog" % self.kind.lower(),
                         daemon=True).start()

    def stop(self):
        with self.lock:
            self.stopped = True
            self.activity.notify()

    def watchdog(self):
        """Asleep until a call is made; then, while calls are being made, wake when the oldest
        pending one reaches the limit (or one limit later) and abandon what is overdue."""
        with self.lock:
            seen = self.calls_made
            while not self.stopped:
                if not self.watched:
                    self.activity.wait()
                    continue
                now = time.monotonic()
                overdue = [(key, call) for key, call in self.pending.items()
                           if not call.abandoned and now - call.started >= self.limit_s]
                for key, call in overdue:
                    call.abandoned = True
                if overdue:
                    self.lock.release()
                    try:
                        for key, call in overdue:
                            if call.abandon is not None:
                                call.abandon(key[1], self.timeout(key, call))
                    finally:
                        self.lock.acquire()
                    continue
                waiting = [call.started for call in self.pending.values() if not call.abandoned]
                if not waiting and self.calls_made == seen:
                    self.watched = False
                    continue
                seen = self.calls_made
                self.activity.wait(max(0.0, min(waiting) + self.limit_s - now) if waiting
                                   else self.limit_s)


# ---- GPU control: one worker thread per GPU, commands run one at a time in arrival order ----

CONTROL_QUEUE_LIMIT = 64
NO_STEP = contextlib.suppress()  # a with-block that does nothing
CLIENT_ERROR_KINDS = ("invalid-argument", "not-supported", "conflict")


class ControlJob:
    """One control command for one GPU; `done` is set once it ran, with `error` if it failed.
    Each one that reaches the GPU leaves an audit line: who, what, with which arguments, and
    the outcome (ERROR level only for the device's failures, not the client's mistakes), and
    whether its caller had already been answered that it took too long."""

    __slots__ = ("gpu", "operation", "args", "named", "who", "limit_s", "deadline", "done",
                 "error", "answered", "claim", "step")

    def __init__(self, gpu, operation, args, named, who, limit_s, claim=None, step=None):
        self.claim = claim  # a HoldClaim: may refuse the change, and puts it on the hold's record
        self.step = step  # step(gpu): a with-block around the change (the node's budget check)
        self.gpu = gpu
        self.operation = operation
        self.args = args
        self.named = named
        self.who = who
        self.limit_s = limit_s
        self.deadline = time.monotonic() + limit_s
        self.done = threading.Event()
        self.error = None
        self.answered = False

    def run(self, backend, counts, counts_lock):
        claimed = None
        try:
            if self.claim is not None:
                claimed = self.claim.before(self.gpu)
            if self.operation != "hold":
                with self.step(self.gpu) if self.step is not None else NO_STEP:
                    getattr(backend, self.operation)(self.gpu, *self.args)
        except DeviceError as err:
            self.error = err
        except Exception as err:
            self.error = DeviceError("failed", "%s failed on GPU %d: %s"
                                     % (self.operation, self.gpu, err))
        result = "ok" if self.error is None else "error"
        with counts_lock:
            counts[self.operation, result] += 1
        audit(result == "error" and self.error.kind not in CLIENT_ERROR_KINDS,
              "%s %s gpu=%d%s: %s%s", self.who, self.operation, self.gpu, self.named,
              "ok" if self.error is None else "error: " + self.error.message,
              " (finished after its caller was told it took too long)" if self.answered else "")
        if claimed is not None:
            self.claim.after(self.gpu, claimed, self.error)
        self.done.set()

    def outcome(self, gone):
        """The job's error, None if it succeeded, or a timeout error once its limit passed."""
        if wait_until(self.done, self.deadline, gone):
            return self.error
        self.answered = True
        return DeviceError("timeout", "GPU %d did not finish %s within %g s; it is still queued "
                           "or running, and its audit line will say how it ended" % (
                               self.gpu, self.operation, self.limit_s))


class GpuControl:
    """Per-GPU command queues (at most 64 waiting) and their worker threads. A background
    worker: start() starts the threads, stop() ends each after the command it is running."""

    def __init__(self, backend):
        self.backend = backend
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # (operation, "ok" or "error") -> operations run
        self.queues = [queue.Queue() for _ in backend.gpus]

    def start(self):
        for index, jobs in enumerate(self.queues):
            threading.Thread(target=self.work, args=(jobs,), name="gpu%d-control" % index,
                             daemon=True).start()

    def stop(self):
        for jobs in self.queues:
            jobs.put(None)

    def submit(self, ids, operation, args, named, who, claim=None, step=None):
        """Queue the command on every GPU in ids, or on none if one of their queues is full;
        named ('power_limit_mw=200000') and who (the caller) are for the audit line, claim and
        step (see ControlJob) for the holds and the node's budget."""
        limit_s = self.backend.limit_s(operation)
        with self.lock:
            for index in ids:
                if self.queues[index].qsize() >= CONTROL_QUEUE_LIMIT:
                    raise DeviceError("busy", "GPU %d is busy: %d commands are waiting"
                                      % (index, CONTROL_QUEUE_LIMIT))
            jobs = [ControlJob(index, operation, args, named, who, limit_s, claim, step)
                    for index in ids]
            for job in jobs:
                self.queues[job.gpu].put(job)
        return jobs

    def enqueue(self, job):
        """Queue a job of the daemon's own (a restore) on its GPU, whatever the queue holds."""
        self.queues[job.gpu].put(job)

    def work(self, jobs):
        job = jobs.get()
        while job is not None:
            job.run(self.backend, self.counts, self.lock)
            job = jobs.get()


# ---- State files: the state directory, and holds.json under flock, its Holds as data ----

HOLDS_FILE = "holds.json"
HOLDS_LOCK = "holds.lock"
HOLDS_RECORD_LIMIT = 1 << 20  # a change that would grow holds.json past this is refused
HOLDS_FILE_LIMIT = HOLDS_RECORD_LIMIT + MAX_FILE_BYTES  # room for the daemon's own marks


def check_state_directory(path, socket_directory):
    """Create the state directory if missing (0700; 0755 when it is also the socket's); exit 1
    naming it if it is a symlink, not a directory, not the daemon's user's, writable by others
    or not writable."""
    if not os.path.lexists(path):
        try:
            os.mkdir(path, 0o755 if os.path.abspath(path) == socket_directory else 0o700)
        except OSError as err:
            raise StartupError("cannot create the state directory %s: %s (--state-dir; "
                               "--no-restore keeps no state)" % (path, err.strerror or err))
    info = os.lstat(path)
    problem = ("is a symlink" if stat.S_ISLNK(info.st_mode) else
               "is not a directory" if not stat.S_ISDIR(info.st_mode) else
               "is owned by uid %d, not the daemon's" % info.st_uid
               if info.st_uid != os.geteuid() else
               "is writable by others (mode %04o)" % (info.st_mode & 0o7777)
               if info.st_mode & 0o022 else None)
    if problem is None and not os.access(path, os.W_OK | os.X_OK):
        problem = "is not writable by the daemon"
    if problem is not None:
        raise StartupError("the state directory %s %s: the daemon keeps the GPUs' saved "
                           "settings there (--state-dir; --no-restore keeps no state)"
                           % (path, problem))


class HoldStore:
    """holds.json in the state directory: {gpu: hold} of every daemon that uses the directory.
    Each change is a read-modify-write under an exclusive flock of holds.lock, the file written
    whole and atomically (temp file, fsync, rename); a file that is not the daemon's user's
    0600 regular file of JSON holds is moved aside with an ERROR line and counts as empty."""

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, HOLDS_FILE)
        self.lock_path = os.path.join(directory, HOLDS_LOCK)
        self.seen = (None, {})  # (the file's identity and mtime, its holds) as last read

    def update(self, change, limit=HOLDS_FILE_LIMIT):
        """change({gpu: Hold}) under the lock, the file rewritten if it changed; its outcome.
        DeviceError("full") if the file would pass limit bytes (it is not written then: the
        daemon never writes a file it would refuse to read), DeviceError("failed") if it
        cannot be written."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                holds = self.load(moving_aside=True)
                before = holds_json(holds)
                outcome = change(holds)
                after = holds_json(holds)
                if after != before:
                    self.save(after, limit)
                return outcome
            finally:
                os.close(fd)
        except OSError as err:
            raise DeviceError("failed", "cannot write the state file %s: %s"
                              % (self.path, err.strerror or err))

    def current(self):
        """{gpu: Hold} as the file has it now (read without the lock: writes are atomic)."""
        return self.load(moving_aside=False)

    def load(self, moving_aside):
        """{gpu: Hold}, new objects each time (the file's last reading is kept as text)."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return {}
        except OSError:
            info = None
        identity = info and (info.st_ino, info.st_mtime_ns, info.st_size)
        if identity is not None and identity == self.seen[0]:
            return self.holds_of(self.seen[1])
        problem = None
        try:
            data, opened = read_small_file(self.path, HOLDS_FILE_LIMIT)
            if opened.st_uid != os.geteuid() or opened.st_mode & 0o077:
                problem = "is not the daemon's user's, or others may read or write it (uid %d, " \
                          "mode %04o)" % (opened.st_uid, opened.st_mode & 0o7777)
            else:
                holds = parse_holds(data)
                self.seen = ((opened.st_ino, opened.st_mtime_ns, opened.st_size),
                             json.dumps(holds))
                return self.holds_of(self.seen[1])
        except OSError as err:
            problem = "cannot be read: %s" % (err.strerror or err)
        except ValueError as err:
            problem = "does not parse: %s" % err
        if moving_aside:
            aside = "%s.bad-%s" % (self.path, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
            try:
                os.rename(self.path, aside)
            except OSError as err:
                aside = "nowhere (%s)" % (err.strerror or err)
            log.error("the state file %s %s; moved it to %s and started with no holds",
                      self.path, problem, aside)
        return {}

    @staticmethod
    def holds_of(text):
        return {key: Hold.of(fields) for key, fields in json.loads(text).items()}

    def save(self, text, limit):
        data = text.encode()
        if len(data) > limit:
            raise DeviceError("full", "the node's hold record is full: %s would grow to %d "
                              "bytes, past %d; release held GPUs first" % (self.path, len(data),
                                                                            limit))
        temp = "%s.%d.tmp" % (self.path, os.getpid())
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, self.path)
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class Hold:
    """One GPU's hold, as holds.json records it: the owner (a uid and its login sessions, or
    a token's user and expiry), when it began, the settings to put back, the daemon that
    keeps it ([pid, start time]), the reason it is being restored (None while it lasts), the
    GPU's energy counter when it began (or why there is no reading), the holder's Slurm job,
    and the changes made during it."""

    __slots__ = ("id", "uid", "user", "exp", "sessions", "since_ms", "saved", "daemon",
                 "restoring", "energy_mj", "energy_note", "job", "changes", "changes_left_out")
    REQUIRED = (("id", str), ("since_ms", int), ("saved", dict), ("daemon", list),
                ("sessions", list))

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name))
        self.changes = self.changes or []
        self.changes_left_out = self.changes_left_out or 0

    @classmethod
    def of(cls, fields):
        """The Hold of a state file's object; ValueError unless it has its fields."""
        if not isinstance(fields, dict) or not all(isinstance(fields.get(name), kind)
                                                   for name, kind in cls.REQUIRED):
            raise ValueError("not a hold")
        return cls(**fields)

    def json(self):
        return {name: getattr(self, name) for name in self.__slots__}


def parse_holds(data):
    """The state file's holds object, {gpu: fields}, from its bytes; ValueError unless every
    hold has its fields."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError):
        raise ValueError("not UTF-8 JSON")
    holds = document.get("holds") if isinstance(document, dict) else None
    if not isinstance(holds, dict):
        raise ValueError("no 'holds' object")
    for key, fields in holds.items():
        try:
            if not DIGITS.fullmatch(key):
                raise ValueError("not a GPU index")
            Hold.of(fields)
        except ValueError:
            raise ValueError("hold %r is not a hold" % shown(key))
    return holds


def holds_json(holds):
    """The state file's text of {gpu: Hold}, keys sorted (so that a change shows)."""
    return json.dumps({"holds": {key: hold.json() for key, hold in holds.items()}},
                      sort_keys=True)



# ---- Receipts: the energy of every ended hold, one JSON line each in receipts.jsonl ----

RECEIPTS_FILE = "receipts.jsonl"
RECEIPTS_ROTATE_BYTES = 64 << 20  # past this the file becomes receipts.jsonl.1
MAX_RECEIPT_BYTES = 1 << 20  # a longer line is no receipt, and is skipped as it is read
SAVED_ORDER = ("power_limit_mw", "persistence_mode", "gpu_locked_clocks", "mem_locked_clocks")
CHANGE_ORDER = ("t_ms", "op")


def holder_name(hold):
    """A hold's user: the token's sub, or the passwd name of its uid (None if it has none)."""
    uid = hold.uid
    if uid is None:
        return hold.user
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def hold_energy(hold, energy_mj, note=None):
    """(J since the hold began, to 3 decimals, None), or (None, why not), given the GPU's
    energy counter now (None, with note: no reading)."""
    start = hold.energy_mj
    if start is None:
        return None, hold.energy_note or "no energy reading when the hold began"
    if energy_mj is None:
        return None, note
    if energy_mj < start:
        return None, "the GPU's energy counter went backwards during the hold (a driver reload?)"
    return round((energy_mj - start) / 1000.0, 3), None


def receipt_of(hold, gpu, uuid, energy_mj, energy_note, reason, restore):
    """The receipt of a hold that ends now."""
    energy_j, note = hold_energy(hold, energy_mj, energy_note)
    receipt = collections.OrderedDict([
        ("hold", hold.id), ("gpu", gpu), ("uuid", uuid), ("uid", hold.uid),
        ("user", holder_name(hold)), ("job", hold.job), ("since_ms", hold.since_ms),
        ("until_ms", int(time.time() * 1000)), ("energy_j", energy_j)])
    if note is not None:
        receipt["energy_note"] = note
    receipt["changes"] = [in_order(change, CHANGE_ORDER) for change in hold.changes]
    if hold.changes_left_out:
        receipt["changes_left_out"] = hold.changes_left_out
    receipt.update([("saved", in_order(hold.saved, SAVED_ORDER)), ("reason", reason),
                    ("restore", restore)])
    return receipt


def in_order(record, order):
    """A record's keys in the order the receipts show them (the state file sorts them)."""
    return collections.OrderedDict(sorted(record.items(), key=lambda item: (
        order.index(item[0]) if item[0] in order else len(order), item[0])))


class Receipts:
    """receipts.jsonl in the state directory: one JSON line per ended hold, appended (O_APPEND)
    and fsynced; past 64 MiB renamed to receipts.jsonl.1 (replacing it) and begun anew. A file
    that is not the daemon's user's 0600 regular file (a symlink, a FIFO, another user's) is
    moved aside with an ERROR line. A receipt that cannot be written is an ERROR line, counted:
    the hold ends all the same."""

    def __init__(self, directory):
        self.path = os.path.join(directory, RECEIPTS_FILE)
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # reason -> receipts written
        self.failures = 0

    def append(self, receipt):
        line = (json.dumps(receipt) + "\n").encode("utf-8")
        try:
            fd = self.open()
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, "wrote %d of %d bytes" % (written, len(line)))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            with self.lock:
                self.failures += 1
            log.error("cannot write the receipt of GPU %d's hold %s to %s: %s",
                      receipt["gpu"], receipt["hold"], self.path, err.strerror or err)
            return
        with self.lock:
            self.counts[receipt["reason"]] += 1

    def open(self):
        """A descriptor appending to the file, which is checked and rotated first."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                    raise
                self.move_aside("is a symlink, a FIFO or a directory")
                continue
            info = os.fstat(fd)
            problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode) else
                       "is not the daemon's user's, or others may read or write it (uid %d, mode "
                       "%04o)" % (info.st_uid, stat.S_IMODE(info.st_mode))
                       if info.st_uid != os.geteuid() or info.st_mode & 0o077 else None)
            if problem is None and info.st_size < RECEIPTS_ROTATE_BYTES:
                return fd
            try:
                if problem is not None:
                    self.move_aside(problem)
                else:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # one daemon of the node rotates it
                    current = os.stat(self.path)
                    if (current.st_ino, current.st_dev) == (info.st_ino, info.st_dev):
                        os.rename(self.path, self.path + ".1")
            finally:
                os.close(fd)
        raise OSError(errno.EAGAIN, "the file keeps being replaced")

    def move_aside(self, problem):
        aside = "%s.bad-%s" % (self.path, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        try:
            os.rename(self.path, aside)
        except OSError as err:
            aside = "nowhere (%s)" % (err.strerror or err)
        log.error("the receipts file %s %s; moved it to %s and began a new one", self.path,
                  problem, aside)

    def written(self, hold_id):
        """Whether a receipt of the hold is on file already (a daemon that died after writing
        it and before ending the hold): read line by line, never whole."""
        needle = ('"hold": "%s"' % hold_id).encode()
        try:
            return any(needle in line for line in receipt_lines(os.path.dirname(self.path)))
        except OSError:
            return False


def receipt_lines(directory):
    """The lines of receipts.jsonl.1, then of receipts.jsonl, read as they come."""
    for name in (RECEIPTS_FILE + ".1", RECEIPTS_FILE):
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NONBLOCK
                         | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        with os.fdopen(fd, "rb") as opened:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "%s is not a regular file" % name)
            too_long = False
            for line in iter(lambda: opened.readline(MAX_RECEIPT_BYTES), b""):
                if not too_long and line.endswith(b"\n"):
                    yield line
                too_long = not line.endswith(b"\n")  # the rest of a line past the bound



# ---- Restores: putting a GPU's saved settings back, and the receipt of its hold ----

RESTORE_OPERATIONS = ("set_power_limit", "set_persistence_mode", "reset_locked_clocks")


class RestoreJob:
    """Puts a GPU's saved settings back, on its control worker: the power limit, then the
    persistence mode, then both locked clocks reset; its receipt, one audit line, and the hold
    ends whatever the outcome (a failure is logged at ERROR and counted)."""

    __slots__ = ("gpu", "hold", "reason", "holds", "done", "error", "receipt")

    def __init__(self, gpu, hold, reason, holds):
        self.gpu = gpu
        self.hold = hold
        self.reason = reason
        self.holds = holds
        self.done = threading.Event()
        self.error = None
        self.receipt = None

    def run(self, backend, counts, counts_lock):
        energy_mj, energy_note = self.holds.energy_now(self.gpu)
        saved, problems = self.hold.saved, []
        steps = [(backend.reset_locked_clocks, ())]
        if saved.get("persistence_mode") is not None:
            steps.insert(0, (backend.set_persistence_mode, (bool(saved["persistence_mode"]),)))
        if saved.get("power_limit_mw") is not None:
            steps.insert(0, (backend.set_power_limit, (saved["power_limit_mw"],)))
        for step, args in steps:
            try:
                step(self.gpu, *args)
            except DeviceError as err:
                problems.append(err.message)
            except Exception as err:
                problems.append("%s failed on GPU %d: %s" % (step.__name__, self.gpu, err))
        if problems:
            self.error = DeviceError("failed", "restoring GPU %d: %s" % (self.gpu,
                                                                       "; ".join(problems)))
        self.receipt = receipt_of(self.hold, self.gpu, backend.gpus[self.gpu].uuid, energy_mj,
                                  energy_note, self.reason, "ok" if not problems else
                                  "error: " + self.error.message)
        self.holds.restored(self, "ok" if not problems else "error")
        persistence = saved.get("persistence_mode")
        audit(bool(problems), "restore gpu=%d power_limit_mw=%s persistence=%s clocks=reset "
              "reason=%s: %s", self.gpu, saved.get("power_limit_mw"),
              "-" if persistence is None else int(bool(persistence)), self.reason,
              "ok" if not problems else "error: " + self.error.message)
        self.done.set()



# ---- Holds: who holds which GPU: conflicts decided, claims, changes on record, releases ----

WATCH_INTERVAL_S = 1.0  # how often session leaders are polled where pidfd_open is missing
RESTORE_WAIT_S = 30.0  # how long a release waits for a GPU's restore
RESTORE_POLL_S = 0.05  # how often a release looks whether another daemon's restore is done
NEVER = threading.Event()  # waited on for a time, never set
RESTORE_STOP_S = 2.0  # how long a stopping daemon waits for restores at least
MAX_SESSIONS = 64  # sessions one hold records: a uid cannot grow the state file without bound
MAX_CHANGES = 100  # changes one hold records; the rest are counted
# An owner: a uid and the login session it asked from (UDS), or a token's user and expiry (TCP);
# admin: an admin token's user, to holds what uid 0 over UDS is.
Owner = collections.namedtuple("Owner", "uid user session exp admin")
Owner.__new__.__defaults__ = (False,)


def iso_time(milliseconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(milliseconds // 1000))


class HoldClaim:
    """What a control command asks of the holds, on its GPU's worker (see Holds.claim and
    Holds.changed): before, whether owner may change the GPU, its hold made or extended; after,
    the change on the hold's record."""

    __slots__ = ("holds", "owner", "change")

    def __init__(self, holds, owner, change):
        self.holds = holds
        self.owner = owner
        self.change = change  # {"op": operation, argument: value, ...}; None for a bare hold

    def before(self, gpu):
        return self.holds.claim(gpu, self.owner)

    def after(self, gpu, claimed, error):
        self.holds.changed(gpu, claimed, self.change, error)


class Holds:
    """Who holds each GPU's settings, and putting them back when the holder is gone.

    The first change an owner makes to a GPU records the GPU's settings as they were (a hold),
    before the change runs, on the GPU's worker; later changes by the same owner extend it.
    Changes by others are refused (a conflict) while it lasts, and by everyone while it is being
    restored; uid 0 over UDS and admin tokens are never refused by a hold (refusal() decides,
    in one place). A restore runs on the GPU's worker, leaves a receipt, and ends the hold;
    the watcher (HoldsWatcher) starts the restores of holds whose owner is gone. An end that
    cannot be written to the state file is logged and written later by the watcher.
    """

    def __init__(self, store, control, backend):
        self.store = store
        self.receipts = Receipts(store.directory)
        self.control = control
        self.backend = backend
        self.me = [os.getpid(), process_start(os.getpid())]
        self.lock = threading.Lock()
        self.restores = collections.Counter()  # (gpu, reason, result) -> restores
        self.write_failures = 0  # state-file writes that failed as a hold ended
        self.running = {}  # gpu -> the RestoreJob this daemon runs on it
        self.unended = {}  # gpu -> id of a hold that ended but could not be written out yet
        self.unknown = set()  # ids of holds of GPUs this daemon does not have (logged once)
        self.wake_read, self.wake_write = os.pipe()  # wake() -> the watcher looks again

    # Changes and releases, for the API

    def conflict(self, owner, ids):
        """The conflict's message for the first of ids that owner may not change, or None."""
        holds = self.store.current()
        for gpu in ids:
            hold = holds.get(str(gpu))
            message = hold and self.refusal(owner, gpu, hold)
            if message:
                return message
        return None

    def refusal(self, owner, gpu, hold):
        """Why owner may not change a GPU with this hold (the conflict's message), or None: the one
        place where conflicts are decided. A GPU being restored is nobody's to change, or a
        change could land between the restore's steps."""
        if hold.restoring:
            return ("GPU %d is being restored (reason %s): its saved settings are being put "
                    "back; try again in a moment." % (gpu, hold.restoring))
        return None if self.may_change(owner, hold) else self.held_message(gpu, hold)

    @staticmethod
    def may_change(owner, hold):
        if owner is None:
            return False
        if owner.uid == 0 or owner.admin:
            return True
        if owner.uid is not None:
            return hold.uid == owner.uid
        return hold.uid is None and hold.user == owner.user

    @staticmethod
    def held_message(gpu, hold):
        since = iso_time(hold.since_ms)
        if hold.uid is not None:
            sessions = hold.sessions
            if sessions == [UNSEEN_SESSION]:
                return ("GPU %d is held by uid %d (a session outside the daemon's view, since "
                        "%s): its settings are restored when it releases it or the daemon "
                        "stops." % (gpu, hold.uid, since))
            return ("GPU %d is held by uid %d (session %s, since %s): its settings are restored "
                    "when that session ends or releases it." % (
                        gpu, hold.uid, sessions[0][0] if sessions else "-", since))
        return ("GPU %d is held by user '%s' (since %s): its settings are restored when that "
                "user's token expires or it releases it." % (gpu, hold.user, since))

    @staticmethod
    def extend(gpu, hold, owner):
        """A change by the holder: its session joins the hold (at most MAX_SESSIONS of them),
        its token's expiry lengthens it. uid 0 and admin tokens leave others' holds as they
        are."""
        if owner.uid is not None:
            if owner.uid != hold.uid or not owner.session or owner.session in hold.sessions:
                return
            if len(hold.sessions) >= MAX_SESSIONS:
                hold.sessions = [session for session in hold.sessions if alive(session)]
            if len(hold.sessions) >= MAX_SESSIONS:
                raise DeviceError("conflict", "GPU %d is held by uid %d in %d sessions, the most "
                                  "one hold records: release it (zeusd release) or end one of "
                                  "them first." % (gpu, owner.uid, MAX_SESSIONS))
            hold.sessions.append(owner.session)
        elif hold.uid is None and hold.user == owner.user and hold.exp is not None:
            hold.exp = None if owner.exp is None else max(hold.exp, owner.exp)

    def claim(self, gpu, owner):
        """Before a change of gpu, on its worker: refuses it if owner may not change the GPU;
        for an owner, records the GPU's settings and its energy counter first as a new hold,
        or extends its hold. (the GPU's hold id, whether the hold is new), or None where
        nobody holds it. The API asked conflict() before queueing the change, to answer at
        once; this second look, under the state file's lock, is the one that counts, since
        another daemon of the node may have changed the file in between."""
        if owner is None:
            message = self.conflict(None, (gpu,))
            if message is not None:
                raise DeviceError("conflict", message)
            return None
        saved = {"power_limit_mw": self.backend.power_limit_mw(gpu),
                 "persistence_mode": self.backend.persistence_mode(gpu),
                 "gpu_locked_clocks": "reset", "mem_locked_clocks": "reset"}
        energy_mj, energy_note = self.energy_now(gpu)
        leader = owner.session[0] if owner.session and alive(owner.session) else None

        def change(holds):
            hold = holds.get(str(gpu))
            if hold is not None:
                message = self.refusal(owner, gpu, hold)
                if message is not None:
                    raise DeviceError("conflict", message)
                self.extend(gpu, hold, owner)
                return hold.id, False
            hold = holds[str(gpu)] = Hold(
                id=binascii.hexlify(os.urandom(8)).decode(), uid=owner.uid, user=owner.user,
                exp=owner.exp, sessions=[owner.session] if owner.session else [],
                since_ms=int(time.time() * 1000), saved=saved, daemon=self.me,
                energy_mj=energy_mj, energy_note=energy_note,
                job=slurm_job_of(leader) if leader else None)
            return hold.id, True
        claimed = self.store.update(change, HOLDS_RECORD_LIMIT)
        if claimed[1] and owner.session == UNSEEN_SESSION:
            log.warning("GPU %d is held by uid %d from outside the daemon's PID namespace, "
                        "where the end of its session cannot be seen: its settings are "
                        "restored on POST /gpu/release or when the daemon stops",
                        gpu, owner.uid)
        self.wake()
        return claimed

    def changed(self, gpu, claimed, change, error):
        """After a change of a held GPU: a success on the hold's record (at most MAX_CHANGES,
        then counted); a failure ends a hold it made (it holds nothing to put back)."""
        hold_id, new = claimed
        if error is not None:
            if new:
                self.end(gpu, hold_id)
            return
        if change is None:
            return
        entry = dict(change, t_ms=int(time.time() * 1000))

        def record(holds):
            hold = holds.get(str(gpu))
            if hold is None or hold.id != hold_id:
                return
            if len(hold.changes) < MAX_CHANGES:
                hold.changes.append(entry)
            else:
                hold.changes_left_out += 1
        try:
            self.store.update(record, HOLDS_RECORD_LIMIT)
        except DeviceError as err:
            log.error("GPU %d's change is not on its hold's record: %s", gpu, err.message)

    def energy_now(self, gpu):
        """(GPU's energy counter in mJ, None), or (None, why there is no reading)."""
        if not self.backend.gpus[gpu].cumulative_energy_available:
            return None, "GPU %d has no total energy counter" % gpu
        try:
            return self.backend.energy_mj(gpu), None
        except DeviceError as err:
            return None, err.message
        except Exception as err:
            return None, "reading GPU %d's energy failed: %s" % (gpu, err)

    def forget(self, gpu, hold_id):
        """End the hold hold_id of a GPU (if it still is the GPU's hold) without a restore."""
        def change(holds):
            if str(gpu) in holds and holds[str(gpu)].id == hold_id:
                del holds[str(gpu)]
        self.store.update(change)

    def end(self, gpu, hold_id):
        """forget(), on the path that ends a hold: a state file that cannot be written is an
        ERROR line, counted, and the watcher writes the end later; the caller goes on."""
        try:
            self.forget(gpu, hold_id)
        except DeviceError as err:
            with self.lock:
                self.unended[gpu] = hold_id
                self.write_failures += 1
            log.error("GPU %d's hold has ended, but %s; the holds watcher tries again every %g s",
                      gpu, err.message, WATCH_INTERVAL_S)
            self.wake()

    def release(self, owner, ids, within, gone=None):
        """Restore the GPUs of ids (None: every GPU of within the owner may release) that are
        held: ({gpu: its RestoreJob}, {gpu: DeviceError} of those whose restore failed);
        DeviceError("conflict") if one of ids is another owner's (nothing is restored then).
        Restores of those GPUs already under way here are waited for, so that their receipts
        are on file when the release answers."""
        scope = within if ids is None else ids

        def change(holds):
            chosen = []
            for key, hold in sorted(holds.items()):
                if hold.restoring or int(key) not in scope:
                    continue
                if not self.may_change(owner, hold):
                    if ids is None:
                        continue
                    raise DeviceError("conflict", self.held_message(int(key), hold))
                chosen.append(key)
            return [self.mark(holds, key, "released") for key in chosen]
        jobs = self.store.update(change)
        self.run(jobs)
        deadline = time.monotonic() + RESTORE_WAIT_S
        errors = {}
        for job in jobs:
            if not wait_until(job.done, deadline, gone):
                errors[job.gpu] = DeviceError("timeout", "GPU %d did not finish its restore "
                                              "within %d s" % (job.gpu, RESTORE_WAIT_S))
            elif job.error is not None:
                errors[job.gpu] = job.error
        self.wait_for_restores(owner, ids, within, deadline, gone)
        return {job.gpu: job for job in jobs}, errors

    def wait_for_restores(self, owner, ids, within, deadline, gone):
        """Wait (until deadline) for the restores under way, this daemon's or another's of
        the node, of the GPUs of ids (else of the GPUs of within the owner may release), so
        that their receipts are on file."""
        while time.monotonic() < deadline:
            restoring = [int(key) for key, hold in self.store.current().items()
                         if hold.restoring and (int(key) in ids if ids is not None else
                                                int(key) in within and
                                                self.may_change(owner, hold))]
            if not restoring:
                return
            with self.lock:
                job = next((self.running[gpu] for gpu in restoring if gpu in self.running),
                           None)
            if job is not None:
                wait_until(job.done, deadline, gone)
            else:  # another daemon's restore: look again in a moment
                wait_until(NEVER, min(deadline, time.monotonic() + RESTORE_POLL_S), gone)

    def mark(self, holds, key, reason):
        """Mark a hold as being restored, this daemon doing it; its RestoreJob."""
        hold = holds[key]
        hold.restoring, hold.daemon = reason, self.me
        return RestoreJob(int(key), hold, reason, self)

    def run(self, jobs):
        """Queue restores (their holds marked in the state file) on their GPUs' workers."""
        for job in jobs:
            with self.lock:
                self.running[job.gpu] = job
            self.control.enqueue(job)

    def restored(self, job, result):
        """A RestoreJob ran: the restore is counted, its receipt on file, and the hold ends
        (after the receipt, so that a receipt is never lost; a daemon that dies in between
        leaves the hold, which its successor ends without a second restore or receipt)."""
        with self.lock:
            self.restores[job.gpu, job.reason, result] += 1
        self.receipts.append(job.receipt)
        self.end(job.gpu, job.hold.id)
        with self.lock:
            if self.running.get(job.gpu) is job:
                del self.running[job.gpu]
        self.wake()

    def view(self):
        """{gpu: hold} as the state file has it now, holds being restored left out."""
        return {int(key): hold for key, hold in self.store.current().items()
                if not hold.restoring}

    def wake(self):
        """Have the watcher (HoldsWatcher) look at the holds again: they changed."""
        os.write(self.wake_write, b"w")

    def restore_all(self, reason):
        """Restore every hold this daemon keeps (it is stopping), waiting for these restores
        and those already under way, each within its bound; a restore still running then is
        left, with its hold, to the next daemon (an ERROR line names the GPU)."""
        def change(holds):
            return [self.mark(holds, key, reason) for key, hold in sorted(holds.items())
                    if hold.daemon == self.me and not hold.restoring]
        try:
            self.run(self.store.update(change))
        except DeviceError as err:
            log.error("cannot restore the GPUs' settings before stopping: %s", err.message)
        with self.lock:
            jobs = sorted(self.running.values(), key=lambda job: job.gpu)
        bound = max([RESTORE_STOP_S] + [self.backend.limit_s(operation)
                                        for operation in RESTORE_OPERATIONS])
        deadline = time.monotonic() + bound
        for job in jobs:
            if not job.done.wait(max(0.0, deadline - time.monotonic())):
                log.error("GPU %d did not finish its restore (reason %s) within %g s of the "
                          "daemon's stop; its hold stays in %s for the next daemon", job.gpu,
                          job.reason, bound, self.store.path)



# ---- Holds watcher: restores the holds whose owner is gone, adopts those of dead daemons ----

PIDFD_OPEN = getattr(os, "pidfd_open", None)  # Python 3.9 and Linux 5.3 or newer
MAX_WATCH_SLEEP_S = 3600.0  # the watcher looks again at least this often (poll takes < 2^31 ms)


class HoldsWatcher:
    """One thread that restores a hold when the owner's last session has ended (UDS owners),
    when its token expires (TCP owners), or when the daemon that recorded it is gone and so is
    its owner; it wakes on the session leaders' pidfds, or polls /proc once a second where
    pidfd_open is missing, and sleeps while this daemon holds nothing. No failure ends it: a
    state file that cannot be written is logged and tried again. A background worker: start()
    adopts the holds of daemons no longer running and starts the thread, stop() ends it."""

    def __init__(self, holds):
        self.holds = holds
        self.stopped = False
        self.pidfds = {}  # session leader pid -> its pidfd

    def start(self):
        self.check()
        threading.Thread(target=self.watch, name="holds-watcher", daemon=True).start()

    def stop(self):
        self.stopped = True
        self.holds.wake()

    def watch(self):
        poller, wake = select.poll(), self.holds.wake_read
        poller.register(wake, select.POLLIN)
        failing = False
        while not self.stopped:
            try:
                timeout = self.follow(poller)
                if failing:
                    log.info("the holds in %s are checked again", self.holds.store.path)
                    failing = False
            except Exception as err:
                if not failing:
                    log.error("cannot check the GPUs' holds in %s: %s: %s; trying again every "
                              "%g s", self.holds.store.path, type(err).__name__, err,
                              WATCH_INTERVAL_S)
                failing, timeout = True, WATCH_INTERVAL_S
            for fd, _ in poller.poll(None if timeout is None else timeout * 1000 + 1):
                if fd == wake:
                    os.read(wake, 4096)
        for fd in self.pidfds.values():
            os.close(fd)

    def follow(self, poller):
        """Check the holds, and watch the session leaders of those this daemon keeps: the
        seconds until the next check is due (at most MAX_WATCH_SLEEP_S; a token may expire in
        a year), None while only a wake-up or a leader's exit can bring one."""
        leaders, expiry = self.check()
        for leader in set(self.pidfds) - leaders:
            poller.unregister(self.pidfds[leader])
            os.close(self.pidfds.pop(leader))
        polled = True
        for leader in leaders - set(self.pidfds):
            try:
                self.pidfds[leader] = PIDFD_OPEN(leader)
                poller.register(self.pidfds[leader], select.POLLIN)
            except (TypeError, OSError):
                polled = False
        timeout = None if polled and not self.holds.unended else WATCH_INTERVAL_S
        if expiry is not None:
            timeout = min(timeout or MAX_WATCH_SLEEP_S, max(0.0, expiry - time.time()))
        return timeout if timeout is None else min(timeout, MAX_WATCH_SLEEP_S)

    def check(self):
        """Write out the ends that could not be written, adopt the holds of daemons no longer
        running, restore those whose owner is gone; (the session leaders to watch, the next
        token expiry) of the holds this daemon keeps. A hold of a GPU this daemon does not
        have is left as it is, for a daemon that has it (one ERROR line)."""
        holds, now = self.holds, time.time()
        leaders, expiries = set(), []
        with holds.lock:
            unended = dict(holds.unended)

        def change(held):
            for gpu, hold_id in unended.items():
                if str(gpu) in held and held[str(gpu)].id == hold_id:
                    del held[str(gpu)]
            jobs = []
            for key, hold in sorted(held.items()):
                if int(key) >= len(holds.control.queues):
                    if hold.id not in holds.unknown:
                        holds.unknown.add(hold.id)
                        log.error("the state file %s has a hold of GPU %s, which this daemon "
                                  "does not have (it has %d GPUs); the hold is left as it is",
                                  holds.store.path, key, len(holds.control.queues))
                    continue
                adopted = hold.daemon != holds.me
                if adopted and alive(hold.daemon):
                    continue
                if hold.restoring:
                    if adopted and holds.receipts.written(hold.id):
                        del held[key]  # restored and on record: its daemon died after that
                    elif adopted:
                        jobs.append(holds.mark(held, key, hold.restoring))
                    continue
                hold.daemon = holds.me
                if hold.uid is not None:
                    hold.sessions = [session for session in hold.sessions if alive(session)]
                    gone = not hold.sessions
                    leaders.update(session[0] for session in hold.sessions
                                   if session != UNSEEN_SESSION)
                else:
                    gone = hold.exp is not None and now >= hold.exp
                    if not gone and hold.exp is not None:
                        expiries.append(hold.exp)
                if gone:
                    reason = "owner-gone" if adopted else (
                        "session-ended" if hold.uid is not None else "token-expired")
                    jobs.append(holds.mark(held, key, reason))
            return jobs
        jobs = holds.store.update(change)
        with holds.lock:
            for gpu, hold_id in unended.items():
                if holds.unended.get(gpu) == hold_id:
                    del holds.unended[gpu]
        holds.run(jobs)
        return leaders, min(expiries) if expiries else None



# ---- Sampling: demand-driven samplers, one read per device per tick, isolated from hangs ----

RELAYS = 2  # sampler threads taking the ticks in turn
ONE_SHOT_GRACE_S = 0.5
HANG_FLOOR_S = 0.25  # a read is taken for a hang after one period, but never sooner than this


class Sample:
    """One tick: the values of the devices that answered and the errors of those that did not.
    `derived` keeps what readers make of it (a rendering, say), so that each is made once
    however many readers ask for it."""

    __slots__ = ("taken", "timestamp_ms", "values", "errors", "derived")

    def __init__(self, taken, timestamp_ms, values, errors):
        self.taken = taken
        self.timestamp_ms = timestamp_ms
        self.values = values
        self.errors = errors
        self.derived = {}

    def merged(self, index, value, error):
        """This sample with one device's late value (or error) put in."""
        values, errors = dict(self.values), dict(self.errors)
        errors.pop(index, None)
        if error is not None:
            errors[index] = error
        elif value is not None:
            values[index] = value
        return Sample(self.taken, self.timestamp_ms, values, errors)


class FailureLog:
    """Logs a device's failures once per run of failures, and its recovery; `failing` holds
    the latest error message of each device failing now."""

    def __init__(self, kind, left_out_of="samples"):
        self.kind = kind
        self.left_out_of = left_out_of
        self.failing = {}  # device -> message

    def failed(self, index, err):
        if index not in self.failing:
            log.error("%s; left out of %s until it reads again", err.message, self.left_out_of)
        self.failing[index] = err.message

    def answered(self, values):
        for index in [i for i in self.failing if i in values]:
            del self.failing[index]
            log.info("%s %s reads again", self.kind, index)


class GpuPowerMeter:
    """Reads one GPU's power in mW."""

    kind = "GPU"

    def __init__(self, backend):
        self.read = backend.power_mw
        self.ids = tuple(range(len(backend.gpus)))


class CpuPowerMeter:
    """One CPU package's and its DRAM's power: RAPL energy deltas over the measured time between
    two reads of that package; None while there is no usable earlier read."""

    kind = "CPU"

    def __init__(self, packages, period):
        self.packages = {package.index: package for package in packages}
        self.ids = tuple(package.index for package in packages)
        self.shortest = period / 4
        self.longest = 2 * period
        self.previous = {}

    def read(self, index):
        now = time.monotonic()
        previous = self.previous.get(index)
        if previous is not None and now - previous[0] < self.shortest:
            return None
        cpu, dram = self.packages[index].read()
        self.previous[index] = (now, cpu, dram)
        if previous is None or now - previous[0] > self.longest:
            return None
        seconds = now - previous[0]
        dram_mw = None
        if dram is not None and previous[2] is not None:
            dram_mw = int(round((dram - previous[2]) / seconds / 1000.0))
        return int(round((cpu - previous[1]) / seconds / 1000.0)), dram_mw


class Sampler:
    """Reads every device of one kind at a fixed rate while anyone subscribes, and broadcasts
    each sample.

    With no subscriber its relays sleep on a condition and make no device call. Two relay
    threads take the ticks of one schedule in turn (each wakes once every two periods, so a
    tick costs what it would on one thread): a tick reads each device once, hands the sample
    to every subscriber, then publishes it through a condition (one-shot readers wait on it).
    A relay stuck in a device read is left behind: the next tick waits at most one period for
    that read, then goes on without that device, and a new relay takes the stuck one's place.
    Healthy devices are thus never delayed by more than one period. The slow device is left
    out of samples while its read is pending; once it has been pending for hang_after (one
    period, never less than 250 ms, so that scheduling delay on a busy node is not taken for a
    hang) it counts as not answering (an error for one-shot readers) until the read returns.
    A read that returns late is still published, put into the latest sample.

    The subscriber protocol: add_stream(subscriber) and remove_stream(subscriber) take any
    object with a `closed` attribute and a `deliver(sample, now)` method. After each tick, the
    relay that ran it calls deliver(sample, now) on every subscriber not closed, in the order
    they were added, from that one thread (never two deliveries at once for one sampler); now
    is time.monotonic(). deliver must not block: a subscriber buffers what it cannot send and
    sets closed to give up. The first sample a subscriber gets is the next tick's; fresh()
    gives the latest one, if any, to start from.
    """

    def __init__(self, hz, meter):
        self.kind = meter.kind
        self.period = 1.0 / hz
        self.hang_after = max(self.period, HANG_FLOOR_S)
        self.meter = meter
        self.device_count = len(meter.ids)
        self.lock = threading.Lock()
        self.demand = threading.Condition(self.lock)
        self.published = threading.Condition(self.lock)
        self.tick_done = threading.Condition(self.lock)
        self.subscribers = 0
        self.streams = ()
        self.latest = None
        self.stopped = False
        self.next_due = 0.0
        self.ticking = False  # whether a relay's tick is in progress
        self.in_flight = {}  # device -> monotonic start of the read in progress
        self.slow = {}  # device -> monotonic start of a read that has not returned in a period
        self.tick_waiters = 0
        self.relays = 0  # relay threads not stuck in a device read
        self.failures = FailureLog(meter.kind)

    def start(self):
        with self.lock:
            while self.relays < RELAYS:
                self.spawn_relay()

    def spawn_relay(self):
        """Start one more relay (the caller holds the lock)."""
        self.relays += 1
        threading.Thread(target=self.relay, name="%s-sampler" % self.kind.lower(),
                         daemon=True).start()

    def add_subscriber(self):
        """One more reader wants samples (the caller holds the lock)."""
        self.subscribers += 1
        if self.subscribers == 1:
            self.demand.notify_all()

    def add_stream(self, subscriber):
        """Deliver every later sample to subscriber; False if the sampler has stopped."""
        with self.lock:
            if self.stopped:
                return False
            self.streams += (subscriber,)
            self.add_subscriber()
            return True

    def remove_stream(self, subscriber):
        with self.lock:
            if subscriber in self.streams:
                self.streams = tuple(s for s in self.streams if s is not subscriber)
                self.subscribers -= 1

    def stop(self):
        """Stop sampling and end every open stream."""
        with self.lock:
            self.stopped = True
            self.demand.notify_all()
            self.published.notify_all()
            self.tick_done.notify_all()
            streams = self.streams
        for subscriber in streams:
            subscriber.close()

    def fresh(self):
        """The latest sample if it is less than one period old, else None. (current() makes
        this check itself first, on the get_power hot path.)"""
        sample = self.latest
        if sample is not None and time.monotonic() - sample.taken < self.period:
            return sample
        return None

    def covering(self, ids):
        """The latest sample if it is fresh and has a value or an error for each of ids."""
        sample = self.fresh()
        if sample is not None and (len(sample.values) == self.device_count or all(
                i in sample.values or i in sample.errors for i in ids)):
            return sample
        return None

    def current(self, ids):
        """A fresh sample covering ids: the latest, or the next the relays take; None if none
        comes within two periods (and a grace)."""
        sample = self.latest  # fresh(), inlined, for a sample of every device
        if sample is not None and time.monotonic() - sample.taken < self.period and \
                len(sample.values) == self.device_count:
            return sample
        sample = self.covering(ids)
        if sample is not None:
            return sample
        deadline = time.monotonic() + 2 * self.period + ONE_SHOT_GRACE_S
        with self.lock:
            self.add_subscriber()
            try:
                while not self.stopped:
                    sample = self.covering(ids)
                    remaining = deadline - time.monotonic()
                    if sample is not None or remaining <= 0:
                        return sample
                    self.published.wait(remaining)
            finally:
                self.subscribers -= 1
        return None

    def relay(self):
        """Take the next tick of the schedule, sleep until it is due, run it; repeat while
        anyone subscribes. A meter that needs another read (a CPU package's first) gets it
        half a period later, so that even a CPU stream's first event comes within one period."""
        while True:
            with self.lock:
                while not self.subscribers and not self.stopped:
                    self.demand.wait()
                if self.stopped or self.relays > RELAYS:
                    self.relays -= 1
                    return
                now = time.monotonic()
                due = self.next_due if self.next_due > now - self.period else now
                self.next_due = due + self.period
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            outcome = self.tick() if self.subscribers and not self.stopped else None
            if outcome == "warming" and not self.stopped:
                time.sleep(self.period / 2)
                self.tick()

    def tick(self):
        """Read each device once and publish the sample: "done", "warming" (a meter needs another
        read), or "abandoned" (this relay was stuck in a read and was left behind).

        Each read is entered in self.in_flight; when it returns, the relay takes its entry back
        out. A relay waiting for this tick takes out an entry older than one period instead:
        dict.pop is atomic, so exactly one of them gets it, without a lock per read."""
        with self.lock:
            self.wait_for_tick_in_progress()
            if self.stopped:
                return "abandoned"
            self.ticking = True
        taken, timestamp_ms = time.monotonic(), int(time.time() * 1000)
        values, errors, warming = {}, {}, False
        read, slow, in_flight = self.meter.read, self.slow, self.in_flight
        for index in self.meter.ids:
            if index in slow:
                if taken - slow.get(index, taken) >= self.hang_after:
                    errors[index] = self.timeout_error(index)
                continue
            in_flight[index] = time.monotonic()
            value = error = None
            try:
                value = read(index)
            except DeviceError as err:
                error = errors[index] = err
            except Exception as err:
                error = errors[index] = DeviceError(
                    "failed", "%s %d: unexpected error reading it: %s: %s"
                    % (self.kind, index, type(err).__name__, err))
            else:
                if value is None:
                    warming = True
                else:
                    values[index] = value
            if in_flight.pop(index, None) is None:
                self.left_behind(index, value, error)
                return "abandoned"
        self.publish(Sample(taken, timestamp_ms, values, errors))
        return "warming" if warming else "done"

    def timeout_error(self, index):
        since = self.slow.get(index, time.monotonic())
        return DeviceError("timeout", "%s %d did not answer within %d ms (its read has been "
                           "pending for %.1f s)" % (self.kind, index, self.hang_after * 1000,
                                                    time.monotonic() - since))

    def wait_for_tick_in_progress(self):
        """Wait (holding the lock) until no other tick is in progress, or until the read it is
        in has taken one period: that relay is then left behind, its device marked as slow,
        and a new relay takes its place."""
        while self.ticking and not self.stopped:
            timeout = self.period
            for index, since in self.in_flight.copy().items():
                timeout = since + self.period - time.monotonic()
                if timeout <= 0 and self.in_flight.pop(index, None) is not None:
                    self.slow[index] = since
                    self.ticking = False
                    self.relays -= 1
                    if self.relays < RELAYS:
                        self.spawn_relay()
                    return
            self.tick_waiters += 1
            self.tick_done.wait(max(timeout, 0.0))
            self.tick_waiters -= 1

    def left_behind(self, index, value, error):
        """This relay's read of index, left behind as slow, has returned: clear the mark,
        rejoin, and publish what it read, put into the latest sample."""
        with self.lock:
            self.slow.pop(index, None)
            self.relays += 1
            self.wait_for_tick_in_progress()
            if self.stopped or self.latest is None or (value is None and error is None):
                return
            self.ticking = True
            sample = self.latest.merged(index, value, error)
        self.publish(sample)

    def publish(self, sample):
        """Log failures and recoveries, write the sample to every stream, then make it the
        latest for one-shot readers and end the tick."""
        if sample.errors:
            for index, err in sample.errors.items():
                if err.kind == "timeout":
                    READ_ERRORS.count(self.kind.lower(), index)
                self.failures.failed(index, err)
        if self.failures.failing:
            self.failures.answered(sample.values)
        now = time.monotonic()
        for subscriber in self.streams:
            if not subscriber.closed:
                subscriber.deliver(sample, now)
        with self.lock:
            self.latest = sample
            self.published.notify_all()
            self.ticking = False
            if self.tick_waiters:
                self.tick_done.notify()


# ---- Node: the devices, samplers and control workers that the enabled groups need ----

class Node:
    """Everything the API reads or drives on this machine."""

    def __init__(self, groups, gpu_hz, cpu_hz, rapl_dir, overrides=None, hold_store=None):
        self.gpu = GpuBackend()
        self.cpus = []
        self.problems = []  # why an enabled group serves fewer devices than the node has
        if "gpu-read" in groups or "gpu-control" in groups:
            self.gpu, problem = open_gpu_backend()
            if problem is not None:
                self.problems.append(problem)
            if overrides:
                self.gpu = OverriddenBackend(self.gpu, overrides)
        if "cpu-read" in groups:
            self.cpus = discover_rapl(rapl_dir)
        self.gpu_ids = tuple(range(len(self.gpu.gpus)))
        self.cpu_ids = tuple(package.index for package in self.cpus)
        self.cpu_by_id = {package.index: package for package in self.cpus}
        self.control = GpuControl(self.gpu) if "gpu-control" in groups else None
        self.holds = Holds(hold_store, self.control, self.gpu) \
            if self.control is not None and hold_store is not None else None
        self.watcher = HoldsWatcher(self.holds) if self.holds is not None else None
        self.gpu_calls = BoundedCalls("GPU")
        self.gpu_sampler = Sampler(gpu_hz, GpuPowerMeter(self.gpu))
        self.cpu_sampler = Sampler(cpu_hz, CpuPowerMeter(self.cpus, 1.0 / cpu_hz))
        self.guard = RaplWrapGuard(self.cpus) if self.cpus else None

    def workers(self):
        """The node's background workers, each with start() and stop()."""
        return [worker for worker in (self.control, self.watcher, self.gpu_calls, self.gpu_sampler,
                                      self.cpu_sampler, self.guard) if worker is not None]

    def start(self):
        for worker in self.workers():
            worker.start()

    def stop(self):
        for worker in reversed(self.workers()):
            worker.stop()


# ==== HTTP: replies, parameters, authentication, access, metrics, streams, API, wire ====

# ---- HTTP, replies: the one reply type, its bytes, and how device errors map to statuses ----

class HttpError(Exception):
    """A request that ends in an error status: a JSON {"error": message} with extra headers,
    as (name, value) pairs."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


DEVICE_STATUS = {"invalid-argument": 400, "not-supported": 400, "no-permission": 403,
                 "conflict": 409, "busy": 503, "full": 503, "timeout": 503, "failed": 500}
SEVERITY = {500: 3, 503: 3, 409: 2, 403: 2, 400: 1}


class Reply:
    """A complete answer: status, body (JSON unless a Content-Type header says otherwise) and
    extra headers as (name, value) pairs. Only the wire layer turns it into bytes."""

    __slots__ = ("status", "body", "headers", "reason")

    def __init__(self, status, body=b"", headers=(), reason=None):
        self.status = status
        self.body = body
        self.headers = headers
        self.reason = reason  # for the request's log line


def json_body(value):
    return json.dumps(value).encode()


def error_body(message):
    """{"error": message} as json.dumps writes it, without its Python-level layers."""
    return b'{"error": %s}' % encode_json_string(message).encode("ascii")


def error_reply(err):
    """The Reply for an HttpError or a DeviceError."""
    if isinstance(err, DeviceError):
        return Reply(DEVICE_STATUS[err.kind], error_body(err.message), reason=err.message)
    return Reply(err.status, error_body(err.message), err.headers, err.message)


def errors_reply(errors):
    """200 with no body, or {"errors": …} for the failed devices under the most severe status."""
    if not errors:
        return EMPTY_OK
    status = max((DEVICE_STATUS[err.kind] for err in errors.values()),
                 key=lambda s: SEVERITY.get(s, 0))
    messages = {str(i): err.message for i, err in sorted(errors.items())}
    return Reply(status, json_body({"errors": messages}), reason="; ".join(messages.values()))


EMPTY_OK = Reply(200)
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}
STATUS_LINES = {code: ("HTTP/1.1 %d %s\r\n" % (code, reason)).encode()
                for code, reason in REASONS.items()}
SERVER_HEADER = ("Server: zeusd-py/%s\r\n" % __version__).encode()
JSON_TYPE = b"Content-Type: application/json\r\n"
PLAIN_HEADS = {code: line + SERVER_HEADER for code, line in STATUS_LINES.items()}
JSON_HEADS = {code: line + SERVER_HEADER + JSON_TYPE for code, line in STATUS_LINES.items()}
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
CONTINUE = STATUS_LINES[100] + b"\r\n"
SSE_HEAD = (STATUS_LINES[200] + SERVER_HEADER + b"Content-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")


def reply_bytes(reply, connection=b"", head_only=False):
    """A Reply's status line, headers and body, to go out in one write."""
    body, headers = reply.body, reply.headers
    if not headers:  # the usual reply, one format (450 instructions less); serve_one inlines it
        head = b"%sContent-Length: %d\r\n%s\r\n" % (
            (JSON_HEADS if body else PLAIN_HEADS)[reply.status], len(body), connection)
        return head if head_only else head + body
    extra = b"".join(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
                     for name, value in headers)
    typed = body and not any(name.lower() == "content-type" for name, _ in headers)
    head = b"%sContent-Length: %d\r\n%s%s\r\n" % (
        (JSON_HEADS if typed else PLAIN_HEADS)[reply.status], len(body), extra, connection)
    return head if head_only else head + body


TOO_MANY_CONNECTIONS = reply_bytes(Reply(503, error_body("Too many connections")), CLOSE)
TOO_MANY_FROM_CLIENT = reply_bytes(Reply(503, error_body("Too many connections from this client")),
                                   CLOSE)



# ---- HTTP, query parameters: strict parsing of booleans, integers and id lists ----

def bad_request(message):
    return HttpError(400, message)


def parse_bool(name, text):
    lowered = text.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise bad_request("Invalid value for '%s': expected true or false, got '%s'."
                      % (name, shown(text)))


def parse_u32(name, text):
    if not DIGITS.fullmatch(text) or int(text) > U32_MAX:
        raise bad_request("Invalid value for '%s': expected a non-negative integer below 2^32, "
                          "got '%s'." % (name, shown(text)))
    return int(text)


def parse_ids(name, text):
    """A tuple of distinct indices from '0,1, 2', in the order given."""
    ids = []
    for item in text.split(","):
        item = item.strip(" ")
        if not DIGITS.fullmatch(item) or int(item) > U32_MAX:
            raise bad_request("Invalid value for '%s': expected comma-separated non-negative "
                              "integers such as 0,1, got '%s'." % (name, shown(text)))
        if int(item) not in ids:
            ids.append(int(item))
    return tuple(ids)


def parse_query(query, spec):
    """Arguments by name from a query string, checked against spec {name: (parser, required)}."""
    args = {}
    if query:
        for item in query.split("&"):
            if not item:
                continue
            raw_name, _, raw_value = item.partition("=")
            name = unquote_plus(raw_name)
            if name not in spec:
                raise bad_request("Unknown query parameter '%s'. Accepted: %s."
                                  % (shown(name), ", ".join(spec) or "none"))
            if name in args:
                raise bad_request("Query parameter '%s' is given more than once." % name)
            args[name] = spec[name][0](name, unquote_plus(raw_value))
    for name, (_, required) in spec.items():
        if required and name not in args:
            raise bad_request("Missing required query parameter '%s'." % name)
    return args


def select_ids(requested, available, kind, list_unknown=False):
    """The requested ids (all available ones if None); 400 if one does not exist, naming the
    first (`GPU index 7 does not exist.`) or listing all (`Unknown GPU indices: [7]. …`)."""
    if requested is None:
        return available
    unknown = [i for i in requested if i not in available]
    if not unknown:
        return requested
    if list_unknown:
        raise bad_request("Unknown %s indices: [%s]. Available: [%s]" % (
            kind, ", ".join(map(str, unknown)), ", ".join(map(str, available))))
    raise bad_request("%s index %d does not exist." % (kind, unknown[0]))



# ---- Authentication: HS256 JSON Web Tokens, signing keys, scopes ----

TOKEN_MAX_LENGTH = 8192
TOO_LONG_TOKEN = "Invalid token: longer than %d characters." % TOKEN_MAX_LENGTH
CACHE_ENTRY_BYTES = 256  # what a cached outcome costs beside its token, about
LEEWAY_S = 60
BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
OPEN_PATHS = ("/discover", "/time", "/health")
BEARER_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="zeusd"'),)
# gpus: absent = every GPU (the Rust daemon's tokens); admin: to holds what uid 0 over UDS is
Claims = collections.namedtuple("Claims", "sub scopes exp gpus admin")
Claims.__new__.__defaults__ = (None, False)


def unauthorized(message):
    return HttpError(401, message, BEARER_CHALLENGE)


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    """The bytes of canonical unpadded base64url: one spelling per value, as signed."""
    if not BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


def unique_keys(pairs):
    """A JSON object's dict; a key given twice is refused, as two readers could differ on it."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("duplicate key")
    return value


def load_signing_key(path):
    """The key file's raw bytes, unmodified; warns if others may read it."""
    try:
        key, info = read_small_file(path)
    except OSError as err:
        raise StartupError("cannot read the signing key %s: %s" % (path, err.strerror or err))
    mode = info.st_mode
    if not key:
        raise StartupError("the signing key file %s is empty; generate one with: "
                           "openssl rand -base64 32 > %s" % (path, path))
    if mode & 0o077:
        log.warning("the signing key %s is readable by group or others (mode %03o); run: "
                    "chmod 600 %s", path, mode & 0o777, path)
    return key


def issue_token(key, sub, scopes, exp, gpus=None, admin=False):
    """A compact HS256 JWT with claims sub, scopes, unless None exp and gpus, and admin if
    true."""
    claims = {"sub": sub, "scopes": list(scopes)}
    if exp is not None:
        claims["exp"] = exp
    if gpus is not None:
        claims["gpus"] = list(gpus)
    if admin:
        claims["admin"] = True
    signing_input = (b64url_encode(b'{"alg":"HS256","typ":"JWT"}') + "."
                     + b64url_encode(json.dumps(claims, separators=(",", ":")).encode("utf-8")))
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url_encode(signature)


def decode_segment(segment, what):
    """A token segment's JSON object; 401 for anything else (deep nesting included)."""
    try:
        value = json.loads(b64url_decode(segment).decode("utf-8"), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError):
        raise unauthorized("Invalid token: the %s is not base64url-encoded JSON with distinct "
                           "keys." % what)
    if not isinstance(value, dict):
        raise unauthorized("Invalid token: the %s is not a JSON object." % what)
    return value


def verify_token(key, token):
    """The claims of a correctly signed HS256 token; HttpError(401) saying what is wrong."""
    if len(token) > TOKEN_MAX_LENGTH:
        raise unauthorized(TOO_LONG_TOKEN)
    segments = token.split(".")
    if len(segments) != 3:
        raise unauthorized("Invalid token: expected three base64url segments separated by dots.")
    header = decode_segment(segments[0], "header")
    if header.get("alg") != "HS256":
        raise unauthorized("Invalid token: algorithm %s is not accepted; only HS256 is."
                           % json.dumps(header.get("alg"))[:64])
    try:
        signature = b64url_decode(segments[2])
    except ValueError:
        raise unauthorized("Invalid token: the signature is not canonical base64url.")
    claims = decode_segment(segments[1], "payload")
    expected = hmac.new(key, (segments[0] + "." + segments[1]).encode("ascii"),
                        hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise unauthorized("Invalid token: signature mismatch.")
    sub, scopes, exp = claims.get("sub"), claims.get("scopes"), claims.get("exp")
    if not isinstance(sub, str):
        raise unauthorized("Invalid token: claim 'sub' must be a string.")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise unauthorized("Invalid token: claim 'scopes' must be a list of API group names.")
    for scope in scopes:
        if scope not in API_GROUPS:
            raise unauthorized("Invalid token: unknown scope %s." % json.dumps(scope)[:64])
    if exp is not None and (type(exp) is not int or exp < 0):
        raise unauthorized("Invalid token: claim 'exp' must be an integer.")
    gpus = claims.get("gpus")
    if gpus is not None:
        if not isinstance(gpus, list) or not all(type(i) is int and 0 <= i <= U32_MAX
                                                 for i in gpus):
            raise unauthorized("Invalid token: claim 'gpus' must be a list of GPU indices.")
        gpus = tuple(sorted(set(gpus)))
    admin = claims.get("admin", False)
    if admin is not True and admin is not False:
        raise unauthorized("Invalid token: claim 'admin' must be true or false.")
    return Claims(sub, tuple(scopes), exp, gpus, admin)


class Authenticator:
    """Checks Authorization headers against the signing key, and token scopes against groups.

    Verification outcomes are cached, failures included, so that a client repeating a badly
    signed token does not make the daemon verify it again; the cache is emptied when it holds
    CACHE_BYTES of tokens, and a token over the length limit is refused without being kept, so
    that a flood of distinct tokens cannot grow the daemon. The key and the cache are swapped
    together when SIGHUP reloads the key, so that no token is ever checked against one key and
    cached under the other.
    """

    CACHE_BYTES = 1 << 20

    def __init__(self, path):
        self.path = path
        self.keyring = (load_signing_key(path), {})
        self.cached_bytes = 0

    def reload(self):
        """Re-read the key file; on failure keep the current key and log why."""
        try:
            self.keyring, self.cached_bytes = (load_signing_key(self.path), {}), 0
        except StartupError as err:
            log.error("SIGHUP: keeping the current signing key: %s", err)
        else:
            log.info("SIGHUP: reloaded the signing key from %s", self.path)

    def authenticate(self, header):
        """The claims of the request's bearer token; HttpError(401) if it has no valid one."""
        if header is None:
            raise unauthorized("Authentication required. "
                               "Provide an Authorization: Bearer <token> header.")
        scheme, _, token = header.strip(" \t").partition(" ")
        if scheme.lower() != "bearer":
            raise unauthorized("Invalid token: the Authorization header must use the Bearer "
                               "scheme.")
        token = token.strip(" \t")
        key, verified = self.keyring
        claims = verified.get(token)
        if claims is None:
            if len(token) > TOKEN_MAX_LENGTH:
                raise unauthorized(TOO_LONG_TOKEN)
            try:
                claims = verify_token(key, token)
            except HttpError as err:
                claims = err.message  # cached as text: a raised error would keep its frames
            if self.cached_bytes >= self.CACHE_BYTES:
                verified.clear()
                self.cached_bytes = 0
            verified[token] = claims
            self.cached_bytes += len(token) + CACHE_ENTRY_BYTES
        if claims.__class__ is str:
            raise unauthorized(claims)
        if claims.exp is not None and time.time() > claims.exp + LEEWAY_S:
            raise unauthorized("Token has expired.")
        return claims


# ---- Access policy: the policy file, and what each of its tables lets a caller change ----

POLICY_SETTINGS = collections.OrderedDict([
    ("power_limit_w", "power limits"), ("gpu_locked_clocks_mhz", "locked GPU clocks"),
    ("mem_locked_clocks_mhz", "locked memory clocks"), ("persistence_mode", "persistence mode")])
POLICY_RANGES = ("power_limit_w", "gpu_locked_clocks_mhz", "mem_locked_clocks_mhz")
IN_USE_CHOICES = ("refuse", "allow")
# operation -> (the policy keys it needs, the request's arguments checked against their range)
OPERATION_RULES = {
    "set_power_limit": (("power_limit_w",), ("power_limit_mw",)),
    "set_gpu_locked_clocks": (("gpu_locked_clocks_mhz",), ("min_clock_mhz", "max_clock_mhz")),
    "set_mem_locked_clocks": (("mem_locked_clocks_mhz",), ("min_clock_mhz", "max_clock_mhz")),
    "set_persistence_mode": (("persistence_mode",), ()),
    "reset_gpu_locked_clocks": (("gpu_locked_clocks_mhz",), ()),
    "reset_mem_locked_clocks": (("mem_locked_clocks_mhz",), ()),
    "reset_locked_clocks": (("gpu_locked_clocks_mhz", "mem_locked_clocks_mhz"), ()),
    "hold": ((), ()),
}


class Grant:
    """What one table, or a caller's group tables combined, allows: a GPU if any table allows
    it; a setting on a GPU if any table that allows the GPU allows it; a range the widest
    among those (True: the GPU's own range)."""

    def __init__(self, name, tables):
        self.name = name
        self.tables = tables  # each {"gpus": None (all) or frozenset, setting: value}

    def allows(self, gpu):
        return any(table["gpus"] is None or gpu in table["gpus"] for table in self.tables)

    def setting(self, gpu, key):
        """False (may not), True (any value the GPU takes), or the (low, high) range."""
        values = [table[key] for table in self.tables
                  if (table["gpus"] is None or gpu in table["gpus"]) and table[key] is not False]
        if not values:
            return False
        if True in values:
            return True
        return min(low for low, _ in values), max(high for _, high in values)

    def gpus_text(self):
        if any(table["gpus"] is None for table in self.tables):
            return "every GPU"
        gpus = sorted(set().union(*[table["gpus"] for table in self.tables]))
        return "GPUs %s" % ", ".join(map(str, gpus)) if gpus else "no GPU"


class Policy:
    """The admin's --policy file, parsed and checked: the node's table, [default], and the
    group. and user. tables by name."""

    def __init__(self, path, budget_w, in_use, default, groups, users):
        self.path = path
        self.budget_w = budget_w
        self.refuse_in_use = in_use == "refuse"
        self.default = default
        self.groups = groups
        self.users = users

    def grant(self, user, groups, token):
        """The Grant of a caller: its user table, else (not for tokens) its groups' tables
        combined, else [default], else None (it may change nothing)."""
        if user is not None and user in self.users:
            return Grant("user." + user, [self.users[user]])
        named = [] if token else [name for name in groups if name in self.groups]
        if named:
            return Grant(", ".join("group." + name for name in named),
                         [self.groups[name] for name in named])
        if self.default is not None:
            return Grant("default", [self.default])
        return None


def policy_refusal(grant, who, operation, ids, arguments, gpu_ids):
    """Why the Grant (None: no table) does not let who make the change on the GPUs ids, as
    the 403 says it, or None if it does."""
    if grant is None:
        return ("%s may not change GPU settings (policy: no table names it, and there is no "
                "[default])." % who)
    for gpu in ids:
        if not grant.allows(gpu):
            return "%s may not change GPU %d (policy: %s allows %s)." % (
                who, gpu, grant.name, grant.gpus_text())
    keys, checked = OPERATION_RULES[operation]
    for gpu in ids:
        for key in keys:
            allowed, what = grant.setting(gpu, key), POLICY_SETTINGS[key]
            if allowed is False:
                elsewhere = any(grant.setting(other, key) is not False for other in gpu_ids)
                return "%s may not %s %s%s (policy: %s)." % (
                    who, operation.partition("_")[0], what, " on GPU %d" % gpu if elsewhere
                    else "", grant.name)
            if allowed is True or not checked:
                continue
            scale, unit = (1000, "W") if key == "power_limit_w" else (1, "MHz")
            asked = [arguments[name] for name in checked]
            if not all(allowed[0] * scale <= value <= allowed[1] * scale for value in asked):
                return "%s may set %s of %d to %d %s on GPU %d (policy: %s); asked %s %s." % (
                    who, what, allowed[0], allowed[1], unit, gpu, grant.name,
                    " to ".join("%g" % (value / float(scale)) for value in asked), unit)
    return None


def load_policy(path, gpu_count=None, flag="--policy"):
    """The Policy of a trusted policy file; StartupError naming the file, line and key."""
    reader = read_trusted_toml(path, flag, "a policy others could change")
    try:
        return parse_policy(path, reader.document(), reader.lines, gpu_count)
    except ValueError as err:
        raise StartupError("%s %s: %s" % (flag, path, err))


def parse_policy(path, document, lines, gpu_count):
    """A Policy from a parsed document; ValueError("line N: [table] key: problem")."""
    def fail(table, key, problem):
        line = lines.get("%s.%s" % (table, key)) or lines.get(table) or 0
        raise ValueError("line %d: [%s] %s%s" % (line, table, key + ": " if key else "",
                                                  problem))

    def table_of(name, values):
        table = {"gpus": frozenset(), "persistence_mode": False}
        table.update((key, False) for key in POLICY_RANGES)
        for key, value in values.items():
            if key == "gpus":
                table["gpus"] = gpus_of(name, value)
            elif key in POLICY_RANGES:
                table[key] = range_of(name, key, value)
            elif key == "persistence_mode":
                if not isinstance(value, bool):
                    fail(name, key, "expected true or false")
                table[key] = value
            else:
                fail(name, key, "unknown key (expected gpus, %s)" % ", ".join(POLICY_SETTINGS))
        return table

    def gpus_of(name, value):
        if value == "all":
            return None
        if not isinstance(value, list) or not all(type(i) is int and i >= 0 for i in value):
            fail(name, "gpus", 'expected "all" or a list of GPU indices such as [0, 1]')
        missing = [i for i in value if gpu_count is not None and i >= gpu_count]
        if missing:
            fail(name, "gpus", "GPU %d does not exist (this node has %d)" % (missing[0],
                                                                            gpu_count))
        return frozenset(value)

    def range_of(name, key, value):
        if isinstance(value, bool):
            return value
        if not isinstance(value, list) or len(value) != 2 or not all(
                type(v) is int and 0 <= v <= U32_MAX for v in value):
            fail(name, key, "expected an inclusive range [low, high] of whole numbers, true (the "
                            "GPU's own range) or false (never)")
        if value[0] > value[1]:
            fail(name, key, "the range is backwards: %d is above %d" % tuple(value))
        return tuple(value)

    budget_w, in_use, default, groups, users = None, "refuse", None, {}, {}
    for name, values in document.items():
        if name == "node":
            for key, value in values.items():
                if key == "gpu_power_budget_w":
                    if type(value) is not int or value <= 0:
                        fail(name, key, "expected a positive whole number of watts")
                    budget_w = value
                elif key == "in_use_by_others":
                    if value not in IN_USE_CHOICES:
                        fail(name, key, 'expected "refuse" or "allow"')
                    in_use = value
                else:
                    fail(name, key, "unknown key (expected gpu_power_budget_w, "
                                    "in_use_by_others)")
        elif name == "default":
            default = table_of(name, values)
        elif name in ("group", "user"):
            for member, member_values in values.items():
                if not isinstance(member_values, dict):
                    fail(name, member, "expected a table [%s.NAME]" % name)
                (groups if name == "group" else users)[member] = table_of(
                    "%s.%s" % (name, member), member_values)
        else:
            fail(name, "", "unknown table (expected [node], [default], [group.NAME] or "
                           "[user.NAME])")
    return Policy(path, budget_w, in_use, default, groups, users)


def log_policy(policy):
    """One INFO line for the policy, and one for each group table no group has."""
    log.info("policy %s: %d user and %d group table(s)%s%s%s", policy.path, len(policy.users),
             len(policy.groups), ", a [default]" if policy.default is not None else
             ", no [default] (callers no table names may change nothing)",
             ", a node budget of %d W" % policy.budget_w if policy.budget_w else "",
             "" if policy.refuse_in_use else ", GPUs in use by others may be changed")
    for name in sorted(policy.groups):
        try:
            grp.getgrnam(name)
        except KeyError:
            log.info("policy %s: [group.%s] names a group this node does not have", policy.path,
                     name)



# ---- Callers: who asks: a TCP client's fair-share key, a change's principal, names and groups ----

USERS_CACHE_S = 60.0  # how long a uid's passwd name and groups are kept
USERS_CACHE_SIZE = 4096


def client_key(host):
    """Who a TCP client is, for its fair share: every loopback address is one client (a local
    user may bind any of 127.0.0.0/8), an IPv6 address counts by its /64, an IPv4 one whole."""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    if "." in host:
        return "loopback" if host.startswith("127.") else host
    if host == "::1":
        return "loopback"
    try:
        prefix = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])[:8]
        return socket.inet_ntop(socket.AF_INET6, prefix + bytes(8)) + "/64"
    except OSError:
        return host


class UserDirectory:
    """The passwd name and group names of uids (primary and supplementary, from the user and
    group databases): looked up once per uid and kept for a minute, never per request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = {}  # uid -> (valid until, name or None, group names)

    def lookup(self, uid, gid=None):
        now = time.monotonic()
        with self.lock:
            entry = self.entries.get(uid)
        if entry is not None and entry[0] > now:
            return entry[1], entry[2]
        try:
            account = pwd.getpwuid(uid)
            name, gids = account.pw_name, os.getgrouplist(account.pw_name, account.pw_gid)
        except KeyError:
            name, gids = None, [] if gid is None else [gid]
        groups = set()
        for group_id in gids:
            try:
                groups.add(grp.getgrgid(group_id).gr_name)
            except KeyError:
                pass
        entry = (now + USERS_CACHE_S, name, tuple(sorted(groups)))
        with self.lock:
            if len(self.entries) >= USERS_CACHE_SIZE:
                self.entries.clear()
            self.entries[uid] = entry
        return entry[1], entry[2]


class Principal:
    """The caller of a request that changes something, as data: its uid, gid and pid over
    UDS (SO_PEERCRED) and its token's claims; exempt from the policy's tables if it is uid 0
    over UDS or holds an admin token. Its name and groups are looked up when first asked."""

    __slots__ = ("caller", "claims", "directory", "found")

    def __init__(self, caller, claims, directory):
        self.caller = caller
        self.claims = claims
        self.directory = directory
        self.found = None

    @property
    def uid(self):
        return self.caller.uid

    @property
    def exempt(self):
        return self.caller.uid == 0 or self.claims is not None and self.claims.admin

    def identity(self):
        """(the user a policy table may name, the caller's group names): the passwd name of a
        UDS caller's uid and its groups; a token's sub over TCP, without groups."""
        if self.found is None:
            if self.caller.uid is not None:
                self.found = self.directory.lookup(self.caller.uid, self.caller.gid)
            else:
                self.found = (self.claims.sub if self.claims is not None else None, ())
        return self.found

    def describe(self):
        if self.caller.uid is not None:
            name = self.identity()[0]
            return "uid %d%s" % (self.caller.uid, " (%s)" % name if name else "")
        if self.claims is not None:
            return "user '%s'" % self.claims.sub
        return "an unauthenticated TCP caller"



# ---- Access: who asks (the principal), and whether it may make the change it asks for ----

HARDWARE_RANGES = {"set_power_limit": "power_limit_mw"}  # ranges read at startup, by operation
BUDGET_LOCK = "budget.lock"


class Refused(HttpError):
    """A change refused by access: counted by reason (policy, in-use, budget, held), and its
    audit line says why (note)."""

    def __init__(self, reason, status, message, note):
        super().__init__(status, message)
        self.reason = reason
        self.note = note


def uid_text(uid):
    if uid is None:
        return "a user the daemon cannot see"
    try:
        return "uid %d (%s)" % (uid, pwd.getpwuid(uid).pw_name)
    except KeyError:
        return "uid %d" % uid


class Access:
    """Every "may this caller do this", in one place: a token's scopes (403) and GPUs (403),
    what a scrape shows it; for a change, the policy's tables (403), the hardware's ranges
    (400), then, after the holds (409, held; decided in Holds.refusal), whether other users'
    processes run on the GPUs (409, in-use) and the node's power budget (409, budget). The
    policy is swapped whole on SIGHUP, and each request reads it once. A request that changes
    nothing never looks at the policy, the groups or the process lists."""

    def __init__(self, node, policy_path=None, state_dir=None):
        self.node = node
        self.policy_path = policy_path
        self.policy = load_policy(policy_path, len(node.gpu_ids)) if policy_path else None
        self.budget_path = os.path.join(state_dir or DEFAULT_STATE_DIR, BUDGET_LOCK)
        self.budget_unlocked = False  # the flock could not be had (logged once)
        self.directory = UserDirectory()
        self.lock = threading.Lock()
        self.budget_lock = threading.Lock()
        self.refusals = collections.Counter()  # reason -> refused requests
        self.unlisted = set()  # GPUs whose process list could not be read, logged once
        if self.policy is not None:
            log_policy(self.policy)

    # What a token may do: its scopes and GPUs (the Rust daemon's tokens carry no gpus claim)

    @staticmethod
    def authorize(claims, group):
        """HttpError(403) unless the token's scopes include the API group."""
        if group not in claims.scopes:
            raise HttpError(403, "Token for user '%s' lacks required scope '%s'. Token scopes: "
                                 "[%s]" % (claims.sub, group,
                                           ", ".join("'%s'" % s for s in claims.scopes)))

    @staticmethod
    def may_read(claims, group):
        """Whether a scrape shows the families of a read group: without auth, or in scope."""
        return claims is None or group in claims.scopes

    def gpus_for(self, requested, claims, list_unknown=False):
        """The GPU ids a request covers: those it names (403 if the token's gpus claim leaves
        one out; 400 if one does not exist), else every GPU the token may use."""
        if claims is None and requested is None:
            return self.node.gpu_ids
        allowed = claims.gpus if claims is not None else None
        if allowed is not None:
            if requested is None:
                return tuple(i for i in self.node.gpu_ids if i in allowed)
            refused = [i for i in requested if i not in allowed]
            if refused:
                raise HttpError(403, "Token for user '%s' is not allowed GPU(s) [%s]. Token GPUs: "
                                     "[%s]" % (claims.sub, ", ".join(map(str, refused)),
                                               ", ".join(map(str, allowed))))
        return select_ids(requested, self.node.gpu_ids, "GPU", list_unknown)

    def out_of_range(self, operation, ids, arguments):
        """{gpu: error} for the GPUs whose hardware range (read at startup) excludes a value
        asked for: refused before anything runs, as NVML would refuse it."""
        if operation not in HARDWARE_RANGES:
            return {}
        milliwatts = arguments[HARDWARE_RANGES[operation]]
        errors = {}
        for index in ids:
            limits = self.node.gpu.gpus[index].power_limit_range
            if limits is not None and not limits[0] <= milliwatts <= limits[1]:
                errors[index] = DeviceError(
                    "invalid-argument", "power_limit_mw=%d is outside GPU %d's power limit range, "
                    "%d to %d mW" % (milliwatts, index, limits[0], limits[1]))
        return errors

    # The policy, the processes on the GPUs, the budget

    def reload(self):
        """SIGHUP: re-read the policy; a bad file keeps the one in force (an ERROR line)."""
        if self.policy_path is None:
            return
        try:
            policy = load_policy(self.policy_path, len(self.node.gpu_ids))
        except StartupError as err:
            log.error("SIGHUP: keeping the current policy: %s", err)
            return
        self.policy = policy
        self.directory = UserDirectory()  # group changes apply at once too
        log.info("SIGHUP: reloaded the policy from %s", self.policy_path)
        log_policy(policy)

    def counted(self, refusal):
        with self.lock:
            self.refusals[refusal.reason] += 1
        return refusal

    def grant(self, principal, policy):
        """(the caller's Grant or None, whether the policy's tables apply to it at all)."""
        if policy is None or principal.exempt:
            return None, False
        user, groups = principal.identity()
        if principal.uid is None and user is not None and not TOML_BARE_KEY.fullmatch(user):
            user = None  # a token's sub that no table could name
        return policy.grant(user, groups, principal.uid is None), True

    def check_policy(self, policy, principal, operation, ids, arguments):
        """Refused(403) unless the policy lets the caller make this change on every GPU.
        (Each check is given the policy the request read once: a reload in between does not
        mix two policies.)"""
        grant, applies = self.grant(principal, policy)
        if not applies:
            return
        message = policy_refusal(grant, principal.describe(), operation, ids, arguments,
                                 self.node.gpu_ids)
        if message is not None:
            raise self.counted(Refused("policy", 403, message, "policy " + (
                grant.name if grant is not None else "(no table)")))

    def users_on(self, gpu, caller):
        """The uids other than the caller's with processes on the GPU (None: one the daemon
        cannot see); () where the GPU's processes cannot be listed (logged once)."""
        calls = self.node.gpu_calls
        results, errors = calls.call_all(self.node.gpu.process_ids, [gpu], caller.gone,
                                         caller.abandon)
        if gpu in errors:
            if gpu not in self.unlisted:
                self.unlisted.add(gpu)
                log.warning("cannot list the processes on GPU %d: %s; changes of it are not "
                            "refused for other users' processes", gpu, errors[gpu].message)
            return ()
        owners = {pid: process_uid(pid) for pid in results[gpu]}
        if None in owners.values():  # a pid that ended between NVML and /proc is not in use
            listed, _ = calls.call_all(self.node.gpu.process_ids, [gpu], caller.gone,
                                       caller.abandon)
            owners = {pid: uid for pid, uid in owners.items()
                      if uid is not None or pid in listed.get(gpu, ())}
        return sorted(set(uid for uid in owners.values() if uid != caller.uid),
                      key=lambda uid: -1 if uid is None else uid)

    def check_in_use(self, policy, principal, ids):
        """Refused(409) if processes of another uid run on one of the GPUs: for UDS callers
        other than uid 0, unless the policy says in_use_by_others = "allow"."""
        if principal.uid in (None, 0) or policy is not None and not policy.refuse_in_use:
            return
        for gpu in ids:
            others = self.users_on(gpu, principal.caller)
            if others:
                raise self.counted(Refused(
                    "in-use", 409, "GPU %d is in use by processes of %s: only they or root may "
                    "change its settings." % (gpu, ", ".join(uid_text(uid) for uid in others)),
                    "in use by %s" % ", ".join("?" if uid is None else str(uid)
                                               for uid in others)))

    def budget_step(self, policy, milliwatts):
        """step(gpu) for a power limit change (see ControlJob): on the GPU's worker, the
        budget checked again and the change made as one step for the node, under this
        daemon's lock and an flock beside the state for the node's other daemons; the API's
        check before it answers at once, this one is the one that counts."""
        return lambda gpu: BudgetStep(self, policy, gpu, milliwatts)

    def check_budget(self, policy, ids, milliwatts, caller):
        """Refused(409) if setting ids to milliwatts raises the sum of the node's GPU power
        limits above the budget. A change that raises no GPU's limit passes without reading
        the others'."""
        if policy is None or policy.budget_w is None:
            return
        if all(milliwatts <= limit for limit in self.power_limits(caller, ids).values()):
            return
        limits = self.power_limits(caller, self.node.gpu_ids)
        before = sum(limits.values())
        after = before - sum(limits[gpu] for gpu in ids) + milliwatts * len(ids)
        if after > before and after > policy.budget_w * 1000:
            raise self.counted(Refused(
                "budget", 409, "The node's GPU power budget is %d W: with GPU%s %s at %g W its "
                "GPUs' power limits would total %g W, %g W over." % (
                    policy.budget_w, "s" if len(ids) > 1 else "", ", ".join(map(str, ids)),
                    milliwatts / 1000.0, after / 1000.0, after / 1000.0 - policy.budget_w),
                "budget %d W" % policy.budget_w))

    def power_limits(self, caller, ids):
        """{gpu: power limit mW} of the GPUs ids; 503 if one cannot be read. (caller None: on a
        GPU's worker, nobody to answer from elsewhere.)"""
        results, errors = self.node.gpu_calls.call_all(
            self.node.gpu.power_limit_mw, ids, caller and caller.gone, caller and caller.abandon)
        for gpu, err in sorted(errors.items()):
            raise HttpError(503, "cannot read GPU %d's power limit, which the node's power "
                                 "budget needs: %s" % (gpu, err.message))
        return results

    def constraints(self, policy, principal, gpu, limits):
        """A GPU's power limit range (min, max mW) as the caller may set it: intersected with
        its policy range where one applies; None where they do not overlap."""
        grant, applies = self.grant(principal, policy)
        allowed = grant.setting(gpu, "power_limit_w") if grant is not None and \
            grant.allows(gpu) else True
        if not applies or allowed in (True, False):
            return limits
        low, high = max(limits[0], allowed[0] * 1000), min(limits[1], allowed[1] * 1000)
        return (low, high) if low <= high else None

    def view(self, principal, ids):
        """What the caller may change, as GET /gpu/policy shows it."""
        policy = self.policy
        grant, applies = self.grant(principal, policy)
        user, groups = principal.identity()
        gpus = {}
        for gpu in ids:
            limits = self.node.gpu.gpus[gpu].power_limit_range
            entry = {}
            for key in POLICY_SETTINGS:
                allowed = True if not applies else False if grant is None or not \
                    grant.allows(gpu) else grant.setting(gpu, key)
                if key == "persistence_mode":
                    entry[key] = allowed
                    continue
                name = "power_limit_mw" if key == "power_limit_w" else key
                if key == "power_limit_w" and allowed is not False and limits is not None:
                    allowed = self.constraints(policy, principal, gpu, limits) or False
                entry[name] = None if allowed is False else list(allowed) \
                    if isinstance(allowed, tuple) else allowed
            entry["in_use_by"] = list(self.users_on(gpu, principal.caller))
            gpus[str(gpu)] = entry
        budget = None
        if policy is not None and policy.budget_w is not None:
            budget = {"gpu_power_budget_w": policy.budget_w, "power_limits_total_w": sum(
                self.power_limits(principal.caller, self.node.gpu_ids).values()) / 1000.0}
        return {"caller": {"uid": principal.uid, "user": user, "groups": list(groups)},
                "table": (grant.name if grant is not None else None) if applies else
                ("exempt" if policy is not None else None), "gpus": gpus, "budget": budget}


class BudgetStep:
    """with, on a GPU's worker: the node's budget checked for the GPU's new power limit, and
    the change made, one at a time on the node (this daemon's lock, and an flock on
    budget.lock in the state directory for the others); a refusal is a DeviceError."""

    def __init__(self, access, policy, gpu, milliwatts):
        self.access = access
        self.policy = policy
        self.gpu = gpu
        self.milliwatts = milliwatts
        self.fd = None

    def __enter__(self):
        access = self.access
        access.budget_lock.acquire()
        try:
            self.fd = os.open(access.budget_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:
            if not access.budget_unlocked:
                access.budget_unlocked = True
                log.error("cannot lock %s for the node's power budget: %s; its changes are "
                          "one at a time within this daemon only", access.budget_path,
                          err.strerror or err)
        try:
            access.check_budget(self.policy, [self.gpu], self.milliwatts, None)
        except HttpError as err:
            self.__exit__()
            raise DeviceError("conflict" if err.status == 409 else "timeout", err.message)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.access.budget_lock.release()



# ---- HTTP, metrics: the Prometheus exposition of the devices and the daemon ----

METRICS_TYPE = (("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsPage:
    """One scrape's text: families in order, each with its HELP and TYPE lines."""

    def __init__(self):
        self.lines = []

    def family(self, name, kind, help_text, samples):
        """samples: [(labels as ((name, value), ...), number)]."""
        self.lines.append("# HELP %s %s\n# TYPE %s %s\n" % (name, help_text, name, kind))
        for labels, value in samples:
            text = ",".join('%s="%s"' % (key, label_value(v)) for key, v in labels)
            self.lines.append("%s{%s} %s\n" % (name, text, repr(float(value))) if text else
                              "%s %s\n" % (name, repr(float(value))))

    def body(self):
        return "".join(self.lines).encode("utf-8")


class Metrics:
    """Counts requests, and renders a scrape: the device families of the enabled read groups
    that the token covers (read fresh: no device call between scrapes), then the daemon's."""

    def __init__(self, node, groups, paths, access):
        self.node = node
        self.access = access
        self.groups = groups
        self.paths = frozenset(paths)
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # (path or "other", status) -> requests answered
        self.open_counts = {}  # id -> the counts of a connection still open
        self.gpu_failures = FailureLog("GPU", "/metrics")
        self.cpu_failures = FailureLog("CPU", "/metrics")
        self.started = process_start_time()

    def connection_opened(self):
        """The counts of a new connection: {(path or "other", status): requests}, written by
        its thread alone, read by scrapes, added to the totals when it closes."""
        counts = {}
        with self.lock:
            self.open_counts[id(counts)] = counts
        return counts

    def connection_closed(self, counts):
        with self.lock:
            del self.open_counts[id(counts)]
            self.requests.update(counts)

    def request_counts(self):
        with self.lock:
            totals = collections.Counter(self.requests)
            for counts in self.open_counts.values():
                totals.update(dict(counts))
        return sorted(totals.items())

    def render(self, claims, gpu_ids, caller):
        """A scrape; a token limited to some GPUs is not shown the node-wide counters."""
        page = MetricsPage()
        if "gpu-read" in self.groups and self.access.may_read(claims, "gpu-read"):
            self.gpu_families(page, gpu_ids, caller)
        if "cpu-read" in self.groups and self.access.may_read(claims, "cpu-read"):
            self.cpu_families(page)
        self.daemon_families(page, node_wide=claims is None or claims.gpus is None)
        return Reply(200, page.body(), METRICS_TYPE)

    def reads(self, what, ids, read, caller):
        """[(id, value)] of the GPUs whose read succeeds within the bounded wait; failures
        left out and logged once."""
        values, errors = self.node.gpu_calls.call_all(read, ids, caller.gone, caller.abandon)
        for index, err in errors.items():
            self.gpu_failures.failed("%d (%s)" % (index, what), err)
        self.gpu_failures.answered(["%d (%s)" % (index, what) for index in values])
        return sorted(values.items())

    def cpu_energy(self):
        """[(id, (package µJ, DRAM µJ))] of the packages that read; failures logged once."""
        results = []
        for package in self.node.cpus:
            try:
                results.append((package.index, package.read()))
            except DeviceError as err:
                self.cpu_failures.failed(package.index, err)
            else:
                self.cpu_failures.answered((package.index,))
        return results

    def gpu_families(self, page, ids, caller):
        backend = self.node.gpu
        page.family("zeusd_gpu_info", "gauge", "The GPUs this daemon serves.",
                    [((("gpu", i), ("name", backend.gpus[i].name),
                       ("pci_address", backend.gpus[i].pci_address),
                       ("uuid", backend.gpus[i].uuid)), 1) for i in ids])
        sample = self.node.gpu_sampler.current(ids)
        values = sample.values if sample is not None else {}
        page.family("zeusd_gpu_power_watts", "gauge", "Instant GPU power.",
                    [((("gpu", i),), values[i] / 1000.0) for i in ids if i in values])
        with_counter = [i for i in ids if backend.gpus[i].cumulative_energy_available]
        energy = self.reads("energy", with_counter, backend.energy_mj, caller)
        page.family("zeusd_gpu_energy_joules_total", "counter",
                    "GPU energy since the driver loaded (NVML total energy).",
                    [((("gpu", i),), mj / 1000.0) for i, mj in energy])
        page.family("zeusd_gpu_power_limit_watts", "gauge", "GPU power limit.",
                    [((("gpu", i),), mw / 1000.0)
                     for i, mw in self.reads("power limit", ids, backend.power_limit_mw, caller)])
        constraints = self.reads("power limit constraints", ids,
                                 backend.power_limit_constraints_mw, caller)
        for name, position, what in (("min", 0, "Lowest"), ("max", 1, "Highest")):
            page.family("zeusd_gpu_power_limit_%s_watts" % name, "gauge",
                        "%s power limit the GPU accepts." % what,
                        [((("gpu", i),), pair[position] / 1000.0) for i, pair in constraints])
        holds = self.node.holds
        if holds is not None:
            held = holds.view()
            page.family("zeusd_gpu_held", "gauge",
                        "Whether a client holds the GPU's settings (restored when it is gone).",
                        [((("gpu", i),), 1 if i in held else 0) for i in ids])
            page.family("zeusd_gpu_hold_energy_joules", "gauge",
                        "GPU energy since the GPU's open hold began (the series ends with it).",
                        [((("gpu", i),), joules) for i, joules in (
                            (i, hold_energy(held[i], mj)[0]) for i, mj in energy if i in held)
                         if joules is not None])
            with holds.lock:
                restores = sorted(holds.restores.items())
                write_failures = holds.write_failures
            page.family("zeusd_gpu_restores_total", "counter",
                        "GPU settings put back, by reason and outcome.",
                        [((("gpu", gpu), ("reason", reason), ("result", result)), count)
                         for (gpu, reason, result), count in restores if gpu in ids])
            page.family("zeusd_state_file_write_errors_total", "counter",
                        "Ends of holds that could not be written to the state file at once.",
                        [((), write_failures)])
            with holds.receipts.lock:
                receipts = sorted(holds.receipts.counts.items())
                receipt_failures = holds.receipts.failures
            page.family("zeusd_receipts_total", "counter",
                        "Receipts of ended holds written to receipts.jsonl, by reason.",
                        [((("reason", reason),), count) for reason, count in receipts])
            page.family("zeusd_receipt_write_errors_total", "counter",
                        "Receipts of ended holds that could not be written.",
                        [((), receipt_failures)])

    def cpu_families(self, page):
        node = self.node
        page.family("zeusd_cpu_info", "gauge", "The RAPL zones (CPU packages, psys) served.",
                    [((("cpu", p.index), ("zone", p.name)), 1) for p in node.cpus])
        energy = self.cpu_energy()
        page.family("zeusd_cpu_energy_joules_total", "counter",
                    "RAPL energy, wraparound-corrected.",
                    [((("cpu", i), ("domain", domain)), uj / 1e6) for i, pair in energy
                     for domain, uj in zip(("package", "dram"), pair) if uj is not None])
        sample = node.cpu_sampler.current(node.cpu_ids)
        values = sample.values if sample is not None else {}
        page.family("zeusd_cpu_power_watts", "gauge", "CPU package and DRAM power.",
                    [((("cpu", i), ("domain", domain)), mw / 1000.0) for i in node.cpu_ids
                     if i in values for domain, mw in zip(("package", "dram"), values[i])
                     if mw is not None])

    def daemon_families(self, page, node_wide):
        """The daemon's own families; node_wide adds the counters of every client's requests
        and control operations."""
        node = self.node
        page.family("zeusd_build_info", "gauge", "The daemon's version and Python.",
                    [((("version", __version__), ("python", sys.version.split()[0])), 1)])
        if node_wide:
            requests = self.request_counts()
            page.family("zeusd_http_requests_total", "counter", "HTTP requests answered.",
                        [((("path", path), ("status", status)), count)
                         for (path, status), count in requests])
            page.family("zeusd_stream_subscribers", "gauge", "Open power streams.",
                        [((("kind", "gpu"),), len(node.gpu_sampler.streams)),
                         ((("kind", "cpu"),), len(node.cpu_sampler.streams))])
            page.family("zeusd_device_read_errors_total", "counter",
                        "Failed device reads: an error from the device, or no answer in time.",
                        [((("kind", kind), ("device", device)), count)
                         for (kind, device), count in READ_ERRORS.items()])
            operations = sorted(node.control.counts.items()) if node.control else []
            page.family("zeusd_gpu_control_operations_total", "counter",
                        "GPU control operations run, by outcome.",
                        [((("operation", operation), ("result", result)), count)
                         for (operation, result), count in operations])
            if node.control:
                with self.access.lock:
                    refusals = sorted(self.access.refusals.items())
                page.family("zeusd_control_refusals_total", "counter",
                            "GPU changes refused, by reason (policy, in-use, budget, held).",
                            [((("reason", reason),), count) for reason, count in refusals])
        cpu_seconds, rss = process_usage()
        page.family("process_cpu_seconds_total", "counter",
                    "Total user and system CPU time spent in seconds.", [((), cpu_seconds)])
        page.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                    [((), rss)])
        page.family("process_start_time_seconds", "gauge",
                    "Start time of the process since unix epoch in seconds.",
                    [((), self.started)])
        page.family("process_open_fds", "gauge", "Number of open file descriptors.",
                    [((), len(os.listdir("/proc/self/fd")))])


def process_usage():
    """(CPU seconds, resident bytes) of this process, from /proc."""
    with open("/proc/self/stat") as stat_file:
        fields = stat_file.read().rpartition(")")[2].split()
    with open("/proc/self/statm") as statm_file:
        resident_pages = int(statm_file.read().split()[1])
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, resident_pages * PAGE_SIZE


def process_start_time():
    with open("/proc/self/stat") as stat_file:
        started_ticks = int(stat_file.read().rpartition(")")[2].split()[19])
    with open("/proc/stat") as stat_file:
        boot = next(int(line.split()[1]) for line in stat_file if line.startswith("btime "))
    return boot + started_ticks / CLOCK_TICKS



# ---- HTTP, streams: samples as JSON bodies and SSE events, and the SSE subscriber ----

KEEPALIVE_COMMENT_S = 15.0
MAX_STREAM_BACKLOG = 65536
SSE_KEEPALIVE = b": keep-alive\n\n"


class PowerRendering:
    """How one kind of device's samples read over HTTP: the get_power body (and all-devices
    event) for a selection, and the per-device event, each made once per sample (kept in its
    `derived`) however many readers ask."""

    def __init__(self, value_json, device_json):
        self.value_json = value_json
        self.device_json = device_json

    def power(self, sample, ids):
        """(selected values, get_power body, all-devices SSE event) for the ids; devices
        without a value are left out (and the event is empty when none has one)."""
        rendered = sample.derived.get(ids)
        if rendered is None:
            values, value_json = sample.values, self.value_json
            selected = tuple([values.get(i) for i in ids])
            body = ('{"timestamp_ms": %d, "power_mw": {%s}}' % (
                sample.timestamp_ms, ", ".join(['"%d": %s' % (i, value_json(value))
                                                for i, value in zip(ids, selected)
                                                if value is not None]))).encode()
            event = b"data: " + body + b"\n\n" if selected.count(None) < len(ids) else b""
            rendered = sample.derived[ids] = (selected, body, event)
        return rendered

    def device_event(self, sample, index):
        """The per-device SSE event of one device that has a value."""
        event = sample.derived.get(index)
        if event is None:
            event = sample.derived[index] = b"data: %s\n\n" % self.device_json(
                sample.timestamp_ms, index, sample.values[index])
        return event


def cpu_value_json(value):
    return '{"cpu_mw": %d, "dram_mw": %s}' % (value[0], "null" if value[1] is None else value[1])


RENDERINGS = {
    "GPU": PowerRendering(str, lambda timestamp_ms, index, milliwatts: (
        b'{"timestamp_ms": %d, "gpu_id": %d, "power_mw": %d}' % (timestamp_ms, index,
                                                                 milliwatts))),
    "CPU": PowerRendering(cpu_value_json, lambda timestamp_ms, index, value: (
        b'{"timestamp_ms": %d, "cpu_id": %d, "cpu_mw": %d, "dram_mw": %s}' % (
            timestamp_ms, index, value[0], b"null" if value[1] is None else b"%d" % value[1]))),
}


class Sent:
    """What a per-device stream has sent of its devices: their latest values, in ids order (None
    before the first). Streams of the same devices that have sent the same values share one
    Sent, so that a sample's events for all of them are made once (Sent.after)."""

    __slots__ = ("ids", "values")

    def __init__(self, ids, values):
        self.ids = ids
        self.values = values

    def after(self, sample, render):
        """(the Sent after this sample, the sample's events for it): one per device whose value
        changed, in ids order; kept in the sample, so each is made once per sample."""
        derived = sample.derived
        step = derived.get(self)
        if step is not None:
            return step
        values, last, events = sample.values, self.values, []
        now = []
        for index, sent in zip(self.ids, last):
            value = values.get(index)
            if value is not None and value != sent:
                events.append(render.device_event(sample, index))
                sent = value
            now.append(sent)
        if events:
            key = (self.ids, tuple(now))
            after = derived.get(key)
            if after is None:
                after = derived[key] = Sent(self.ids, key[1])
            step = (after, b"".join(events))
        else:
            step = (self, b"")
        derived[self] = step
        return step


class SseSubscriber:
    """An open SSE connection, a sampler's subscriber: its relays write to it without
    blocking, one event per sample (all-devices) or one per device and sample (per-device),
    sent when a selected value changed; all of a sample's events for it in one write."""

    __slots__ = ("sock", "ids", "per_device", "render", "last_values", "last_write", "pending",
                 "closed", "sent")

    def __init__(self, sock, ids, per_device, kind):
        self.sock = sock
        self.ids = ids
        self.per_device = per_device
        self.render = RENDERINGS[kind]
        self.last_values = None
        self.sent = Sent(ids, (None,) * len(ids)) if per_device else None
        self.last_write = time.monotonic()
        self.pending = b""
        self.closed = False

    def events(self, sample):
        """The events that sample holds for this subscriber (b"" if none), as sent."""
        if self.per_device:
            self.sent, events = self.sent.after(sample, self.render)
            return events
        values, _, event = self.render.power(sample, self.ids)
        if values == self.last_values or not event:
            return b""
        self.last_values = values
        return event

    def deliver(self, sample, now):
        """Send the sample's events, else a keep-alive comment when one is due."""
        if self.per_device:
            step = sample.derived.get(self.sent)
            if step is None:
                step = self.sent.after(sample, self.render)
            self.sent, data = step
        else:
            data = self.events(sample)
        if data:
            if self.pending:
                self.write(data, now)
                return
            try:  # write, without its call, for a stream that is keeping up
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            self.last_write = now
            if sent < len(data):
                self.pending = data[sent:]
        elif now - self.last_write >= KEEPALIVE_COMMENT_S:
            self.write(SSE_KEEPALIVE, now)

    def write(self, data, now):
        data = self.pending + data if self.pending else data
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        self.pending = data[sent:]
        self.last_write = now
        if len(self.pending) > MAX_STREAM_BACKLOG:
            log.warning("dropping a stream whose client stopped reading")
            self.close()

    def close(self):
        """End the stream: its connection thread, blocked reading the socket, wakes and exits."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---- HTTP, control handlers: changes checked and queued, holds, releases, policies ----

def hold_json(hold, energy_mj, energy_note):
    """A hold as /gpu/holds shows it, given its GPU's energy counter now."""
    energy_j, note = hold_energy(hold, energy_mj, energy_note)
    shown = {"uid": hold.uid, "user": holder_name(hold),
             "sessions": [session[0] for session in hold.sessions] if hold.uid is not None
             else None, "since_ms": hold.since_ms, "saved": hold.saved, "energy_j": energy_j,
             "changes": hold.changes}
    if note is not None:
        shown["energy_note"] = note
    return shown


class ControlHandlers:
    """Api's handlers of changes (checked by Access, then queued on the GPUs' workers),
    holds and releases, and the caller's policy; a part of Api, whose node and access they
    use."""

    def control(self, operation, *arg_names):
        def handler(args, claims, request):
            ids = self.access.gpus_for(args["gpu_ids"], claims)
            values = tuple(args[n] for n in arg_names)
            named = "".join(" %s=%s" % (n, str(v).lower() if isinstance(v, bool) else v)
                            for n, v in zip(arg_names, values))
            who = request.caller.peer + (" user=" + claims.sub if claims is not None else "")
            claim, holds, block = None, self.node.holds, args.get("block", True)
            owner = self.owner(request, claims)
            if operation == "hold":
                if holds is None:
                    raise HttpError(400, "This daemon keeps no holds (--no-restore).")
                if owner is None:
                    raise HttpError(403, "Holding a GPU needs an owner: a Unix-socket caller or "
                                         "a token.")
            else:
                named += " block=%s" % str(block).lower()
            access, caller, policy = self.access, request.caller, self.access.policy
            principal = Principal(caller, claims, access.directory)
            budgeted = operation == "set_power_limit" and policy is not None and \
                policy.budget_w is not None
            try:
                access.check_policy(policy, principal, operation, ids, dict(zip(arg_names,
                                                                                values)))
                out_of_range = access.out_of_range(operation, ids, dict(zip(arg_names, values)))
                if out_of_range:
                    return errors_reply(out_of_range)
                if holds is not None:
                    message = holds.conflict(owner, ids)
                    if message is not None:
                        raise access.counted(Refused("held", 409, message, "held"))
                access.check_in_use(policy, principal, ids)
                if holds is not None:
                    claim = HoldClaim(holds, owner, None if operation == "hold" else dict(
                        [("op", operation)] + list(zip(arg_names, values))))
                step = None
                if budgeted:
                    access.check_budget(policy, ids, values[0], caller)
                    step = access.budget_step(policy, values[0])
            except Refused as refusal:
                audit(False, "%s %s gpu=%s%s: refused: %s", who, operation,
                      ",".join(map(str, ids)), named, refusal.note)
                raise
            jobs = self.node.control.submit(ids, operation, values, named, who, claim, step)
            if not block:
                return EMPTY_OK
            outcomes = [(job.gpu, job.outcome(caller.gone)) for job in jobs]
            return errors_reply({gpu: error for gpu, error in outcomes if error is not None})
        return handler

    @staticmethod
    def owner(request, claims):
        """Who owns the changes a request makes: over UDS the caller's uid and login session,
        over TCP the token's user (until it expires); None (unowned) over TCP without auth."""
        caller = request.caller
        if caller.uid is not None:
            return Owner(caller.uid, None, session_of(caller.pid, caller.connected), None,
                         claims is not None and claims.admin)
        if claims is not None:
            return Owner(None, claims.sub, None, claims.exp, claims.admin)
        return None

    def release(self, args, claims, request):
        requested = args.get("gpu_ids")
        ids = None if requested is None else self.access.gpus_for(requested, claims)
        holds = self.node.holds
        if holds is None:
            return Reply(200, b"{}")
        try:
            ended, errors = holds.release(self.owner(request, claims), ids,
                                          self.access.gpus_for(None, claims), request.caller.gone)
        except DeviceError as err:
            raise HttpError(409, err.message)
        if errors:
            return errors_reply(errors)
        return Reply(200, json_body({str(gpu): job.receipt for gpu, job in ended.items()}))

    def holds(self, args, claims, request):
        ids = self.access.gpus_for(args.get("gpu_ids"), claims)
        held = self.node.holds.view() if self.node.holds is not None else {}
        counted = [gpu for gpu in ids if gpu in held and held[gpu].energy_mj is not None]
        caller = request.caller
        energy, errors = self.node.gpu_calls.call_all(self.node.gpu.energy_mj, counted,
                                                      caller.gone, caller.abandon)
        return Reply(200, json_body({str(gpu): hold_json(
            held[gpu], energy.get(gpu), errors[gpu].message if gpu in errors else None)
            for gpu in ids if gpu in held}))

    def policy(self, args, claims, request):
        ids = self.access.gpus_for(args.get("gpu_ids"), claims)
        return Reply(200, json_body(self.access.view(
            Principal(request.caller, claims, self.access.directory), ids)))



# ---- HTTP, read handlers: power, streams, energy, limits and constraints ----

Stream = collections.namedtuple("Stream", "sampler ids per_device")


class ReadHandlers:
    """Api's handlers of reads: power (fresh samples), streams, energy, limits and their
    constraints; a part of Api, whose node and access they use."""

    def constraints(self, args, claims, request):
        """Each GPU's power limit range, intersected with the caller's policy range."""
        ids = self.access.gpus_for(args.get("gpu_ids"), claims)
        caller = request.caller
        results, errors = self.node.gpu_calls.call_all(self.node.gpu.power_limit_constraints_mw,
                                                       ids, caller.gone, caller.abandon)
        if errors:
            return errors_reply(errors)
        policy = self.access.policy
        if policy is not None:
            principal = Principal(caller, claims, self.access.directory)
            results = {gpu: self.access.constraints(policy, principal, gpu, limits) or limits
                       for gpu, limits in results.items()}
        return Reply(200, json_body({str(i): {"min_power_limit_mw": results[i][0],
                                              "max_power_limit_mw": results[i][1]} for i in ids}))

    def gpu_read(self, read, shape):
        """A handler answering {id: shape(read(id))} for the GPUs a request covers."""
        def handler(args, claims, request):
            ids = self.access.gpus_for(args.get("gpu_ids"), claims)
            caller = request.caller
            results, errors = self.node.gpu_calls.call_all(read, ids, caller.gone,
                                                           caller.abandon)
            if errors:
                return errors_reply(errors)
            return Reply(200, json_body({str(i): shape(results[i]) for i in ids}))
        return handler

    def gpu_power(self, args, claims, request):
        ids = self.access.gpus_for(args.get("gpu_ids"), claims, list_unknown=True)
        return self.power(self.node.gpu_sampler, ids)

    def gpu_stream(self, args, claims, request):
        return Stream(self.node.gpu_sampler,
                      self.access.gpus_for(args.get("gpu_ids"), claims, list_unknown=True),
                      self.per_device)

    def cpu_power(self, args, claims, request):
        ids = select_ids(args.get("cpu_ids"), self.node.cpu_ids, "CPU", list_unknown=True)
        return self.power(self.node.cpu_sampler, ids)

    def cpu_stream(self, args, claims, request):
        return Stream(self.node.cpu_sampler, select_ids(args.get("cpu_ids"), self.node.cpu_ids,
                                                        "CPU", list_unknown=True), self.per_device)

    @staticmethod
    def power(sampler, ids):
        """A fresh sample's values for ids, or the errors of those that failed or hang."""
        sample = sampler.current(ids)
        if sample is None:
            raise HttpError(503, "No %s power sample came within %d ms; try again."
                            % (sampler.kind, (2 * sampler.period + ONE_SHOT_GRACE_S) * 1000))
        errors = sample.errors and {i: sample.errors[i] for i in ids if i in sample.errors}
        return errors_reply(errors) if errors else Reply(200, RENDERINGS[sampler.kind].power(
            sample, ids)[1])

    def cpu_energy(self, args, claims, request):
        results, errors = {}, {}
        for index in select_ids(args.get("cpu_ids"), self.node.cpu_ids, "CPU"):
            cpu = dram = None
            if args["cpu"] or args["dram"]:
                try:
                    cpu, dram = self.node.cpu_by_id[index].read()
                except DeviceError as err:
                    errors[index] = err
                    continue
            results[str(index)] = {"cpu_energy_uj": cpu if args["cpu"] else None,
                                   "dram_energy_uj": dram if args["dram"] else None}
        return errors_reply(errors) if errors else Reply(200, json_body(results))



# ---- HTTP, API: the routes, and each request's group gate, auth, method, parameters ----

Request = collections.namedtuple("Request", "method path query version headers caller")
Route = collections.namedtuple("Route", "group method params handler")
IDS = (parse_ids, False)
REQUIRED_IDS = (parse_ids, True)
BOOL = (parse_bool, True)
U32 = (parse_u32, True)
HEALTHY = Reply(200, b'{"status": "ok"}')
NO_ARGUMENTS = {}  # the arguments of a request without a query string, shared: never changed
INTERNAL_ERROR = Reply(500, error_body("Internal server error; see the daemon's log."),
                       reason="internal error (traceback above)")


class Api(ControlHandlers, ReadHandlers):
    """Answers a parsed request: group gate, auth, route with its scope and method, parameters,
    handler, in that order; every failure becomes an error Reply."""

    def __init__(self, node, groups, authenticator, stream_format="per-device", access=None):
        self.node = node
        self.groups = groups
        self.auth = authenticator
        self.access = access or Access(node)
        self.stream_format = stream_format
        self.per_device = stream_format == "per-device"
        self.disabled = {}
        self.routes = {}
        for path, route in self.all_routes().items():
            if route.group is not None and route.group not in groups:
                self.disabled[path] = "API group '%s' is not enabled on this server." % route.group
            else:
                self.routes[path] = route
        if authenticator is None:
            del self.routes["/auth/whoami"]
            self.disabled["/auth/whoami"] = "Authentication is not enabled on this server."
        if "gpu-read" not in groups and "cpu-read" not in groups:
            del self.routes["/metrics"]
            self.disabled["/metrics"] = ("Neither API group 'gpu-read' nor 'cpu-read' is enabled "
                                         "on this server.")
        self.required = {path: [name for name, (_, required) in (route.params or {}).items()
                                if required] for path, route in self.routes.items()}
        self.metrics = Metrics(node, groups, list(self.routes) + list(self.disabled), self.access)
        self.discover_reply = Reply(200, json_body(self.discovery()))

    def all_routes(self):
        gpu, gpu_ids, ctl = self.node.gpu, {"gpu_ids": IDS}, {"gpu_ids": REQUIRED_IDS,
                                                               "block": BOOL}
        clocks = dict(ctl, min_clock_mhz=U32, max_clock_mhz=U32)
        return {
            "/discover": Route(None, "GET", None, self.discover),
            "/time": Route(None, "GET", None, self.time),
            "/health": Route(None, "GET", {"strict": (parse_bool, False)}, self.health),
            "/auth/whoami": Route(None, "GET", None, self.whoami),
            "/metrics": Route(None, "GET", None, self.scrape),
            "/gpu/set_power_limit": Route(
                "gpu-control", "POST", dict(ctl, power_limit_mw=U32),
                self.control("set_power_limit", "power_limit_mw")),
            "/gpu/set_persistence_mode": Route(
                "gpu-control", "POST", dict(ctl, enabled=BOOL),
                self.control("set_persistence_mode", "enabled")),
            "/gpu/set_gpu_locked_clocks": Route(
                "gpu-control", "POST", clocks,
                self.control("set_gpu_locked_clocks", "min_clock_mhz", "max_clock_mhz")),
            "/gpu/reset_gpu_locked_clocks": Route(
                "gpu-control", "POST", ctl, self.control("reset_gpu_locked_clocks")),
            "/gpu/set_mem_locked_clocks": Route(
                "gpu-control", "POST", clocks,
                self.control("set_mem_locked_clocks", "min_clock_mhz", "max_clock_mhz")),
            "/gpu/reset_mem_locked_clocks": Route(
                "gpu-control", "POST", ctl, self.control("reset_mem_locked_clocks")),
            "/gpu/reset_locked_clocks": Route(
                "gpu-control", "POST", ctl, self.control("reset_locked_clocks")),
            "/gpu/release": Route("gpu-control", "POST", gpu_ids, self.release),
            "/gpu/hold": Route("gpu-control", "POST", {"gpu_ids": REQUIRED_IDS},
                               self.control("hold")),
            "/gpu/holds": Route("gpu-read", "GET", gpu_ids, self.holds),
            "/gpu/get_power": Route("gpu-read", "GET", gpu_ids, self.gpu_power),
            "/gpu/stream_power": Route("gpu-read", "GET", gpu_ids, self.gpu_stream),
            "/gpu/get_cumulative_energy": Route(
                "gpu-read", "GET", gpu_ids, self.gpu_read(gpu.energy_mj, lambda value: {
                    "energy_mj": value})),
            "/gpu/get_power_limit": Route(
                "gpu-read", "GET", gpu_ids, self.gpu_read(gpu.power_limit_mw, lambda value: {
                    "power_limit_mw": value})),
            "/gpu/get_power_limit_constraints": Route("gpu-read", "GET", gpu_ids,
                                                      self.constraints),
            "/gpu/policy": Route("gpu-control", "GET", gpu_ids, self.policy),
            "/gpu/get_persistence_mode": Route(
                "gpu-read", "GET", gpu_ids, self.gpu_read(gpu.persistence_mode, lambda value: {
                    "enabled": value})),
            "/cpu/get_cumulative_energy": Route(
                "cpu-read", "GET", {"cpu_ids": IDS, "cpu": BOOL, "dram": BOOL}, self.cpu_energy),
            "/cpu/get_power": Route("cpu-read", "GET", {"cpu_ids": IDS}, self.cpu_power),
            "/cpu/stream_power": Route("cpu-read", "GET", {"cpu_ids": IDS}, self.cpu_stream),
        }

    def discovery(self):
        node = self.node
        return {
            "gpu_ids": list(node.gpu_ids),
            "cpu_ids": list(node.cpu_ids),
            "dram_available": [package.dram is not None for package in node.cpus],
            "enabled_api_groups": list(self.groups),
            "auth_required": self.auth is not None,
            "gpus": [{"id": i, "name": gpu.name, "pci_address": gpu.pci_address,
                      "cumulative_energy_available": gpu.cumulative_energy_available}
                     for i, gpu in enumerate(node.gpu.gpus)],
            "cpus": [{"id": package.index, "name": package.name,
                      "dram_available": package.dram is not None} for package in node.cpus],
            "version": __version__,
            "stream_format": self.stream_format,
        }

    def handle(self, request):
        """(a Reply or a Stream, the token's user or None) for a parsed request: the group
        gate, authentication, the route with its scope and method, the parameters, the
        handler."""
        claims = None
        path = request.path
        try:
            message = self.disabled.get(path)
            if message is not None:
                return Reply(404, error_body(message), reason=message), None
            if self.auth is not None and path not in OPEN_PATHS:
                claims = self.auth.authenticate(request.headers.get("authorization"))
            route = self.routes.get(path)
            if route is None:
                message = "Not found: no endpoint at %s." % shown(path)
                result = Reply(404, error_body(message), reason=message)
            else:
                if claims is not None and route.group is not None:
                    self.access.authorize(claims, route.group)
                if request.method != route.method:
                    raise HttpError(405, "Method %s is not allowed on %s; use %s."
                                    % (request.method, path, route.method),
                                    (("Allow", route.method),))
                params, query = route.params, request.query
                if params is None:
                    args = None
                elif query or self.required[path]:
                    args = parse_query(query, params)
                else:
                    args = NO_ARGUMENTS
                result = route.handler(args, claims, request)
        except (HttpError, DeviceError) as err:
            result = error_reply(err)
        except CallerGone:
            raise
        except Exception:
            log.exception("internal error answering %s %s", request.method, shown(path))
            result = INTERNAL_ERROR
        return result, claims.sub if claims is not None else None

    # Handlers: each takes the parsed arguments and the token's claims, and returns a Reply
    # or a Stream.

    def discover(self, args, claims, request):
        return self.discover_reply

    @staticmethod
    def time(args, claims, request):
        return Reply(200, b'{"timestamp_ms": %d}' % int(time.time() * 1000))

    def health(self, args, claims, request):
        """200 while every device answered its latest read, else 503 naming what fails; 200
        "degraded" (503 with strict=true) where a GPU group serves no GPUs because NVML did
        not load."""
        node, metrics = self.node, self.metrics
        failing = set(node.gpu_calls.overdue().values())
        for failures in (node.gpu_sampler.failures, node.cpu_sampler.failures,
                         metrics.gpu_failures, metrics.cpu_failures):
            failing.update(failures.failing.values())
        if not failing and node.problems and not args.get("strict"):
            return Reply(200, json_body({"status": "degraded", "problems": node.problems}))
        failing.update(node.problems if args.get("strict") else ())
        if not failing:
            return HEALTHY
        message = "; ".join(sorted(failing))
        return Reply(503, error_body(message), reason=message)

    @staticmethod
    def whoami(args, claims, request):
        body = {"sub": claims.sub, "scopes": list(claims.scopes)}
        if claims.exp is not None:
            body["exp"] = claims.exp
        if claims.gpus is not None:
            body["gpus"] = list(claims.gpus)
        if claims.admin:
            body["admin"] = True
        return Reply(200, json_body(body))

    def scrape(self, args, claims, request):
        return self.metrics.render(claims, self.access.gpus_for(None, claims), request.caller)



# ---- HTTP, heads: a request head read strictly, the lines met before from a cache ----

MAX_HEADER_LINES = 100
# method, target (no spaces or control characters), version
REQUEST_LINE_PATTERN = rb"([A-Z]{1,20}) ([\x21-\x7e\x80-\xff]+) (HTTP/[0-9]\.[0-9])"
# an RFC 9110 token as the name; the value free of CR, LF, NUL and other control characters but
# the tab (parse_head trims spaces and tabs, and nothing else, around it)
TOKEN_PATTERN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
FIELD_VALUE_PATTERN = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
HEADER_LINE_PATTERN = TOKEN_PATTERN + rb":" + FIELD_VALUE_PATTERN
REQUEST_LINE = re.compile(REQUEST_LINE_PATTERN)
# a whole head, its lines joined by LF, checked in one match; its fields then found in one more
HEAD = re.compile(REQUEST_LINE_PATTERN + rb"((?:\n" + HEADER_LINE_PATTERN + rb")*)")
HEADER_FIELD = re.compile(rb"\n([^:\n]+):([^\n]*)")


# Request lines and header lines seen before (each valid, at most MAX_KNOWN_LINE bytes), as
# parse_head reads them: a head made of lines met before, in any order or combination (a
# tracing header that differs each time among lines that do not, a new connection of a client
# that has been here before), is read in a dictionary lookup per line. At most MAX_KNOWN lines
# each (emptied when full): within a few hundred KB whatever clients send.
KNOWN_REQUEST_LINES = {}  # request line -> (method, path, query, version)
KNOWN_FIELDS = {}  # header line -> (lowercase name, trimmed value), or NOT_READ
# The header fields the daemon reads; a Request's headers hold only these (the others are
# checked as strictly, then left out)
READ_FIELDS = frozenset(["authorization", "connection", "content-length", "expect",
                         "transfer-encoding"])
NOT_READ = ()
MAX_KNOWN = 512
MAX_KNOWN_LINE = 512
# a header line, as HEADER_LINE_PATTERN; its group 1 matches where the name is one of READ_FIELDS
FIELD_LINE = re.compile(rb"(?:(?i:(%s))|%s):%s" % (
    "|".join(sorted(READ_FIELDS)).encode(), TOKEN_PATTERN, FIELD_VALUE_PATTERN))


def parse_head(head, caller=None, last=None):
    """A Request from a head (request line and header lines, without the empty line); last,
    the connection's previous Request, again if the head asks the same (only fields the daemon
    does not read differ, such as a tracing client's request id).

    A head of CRLF lines each valid (every line already known, or checked here) is read line
    by line; anything else, malformed heads included, takes parse_head_in_full, whose answer
    (a Request or the error of its first fault) is the same for every head."""
    lines = head.split(b"\r\n")
    if head[-1:] != b"\r" or len(lines) > MAX_HEADER_LINES + 1:
        return parse_head_in_full(head, caller)
    lines[-1] = lines[-1][:-1]
    first = KNOWN_REQUEST_LINES.get(lines[0])
    if first is None:
        first = known_request_line(lines[0])
        if first is None:
            return parse_head_in_full(head, caller)
    del lines[0]
    headers, known = {}, KNOWN_FIELDS
    for line in lines:
        field = known.get(line)
        if field is None:
            field = known_field(line)
            if field is None:
                return parse_head_in_full(head, caller)
        if field is not NOT_READ:
            name, value = field
            if name not in headers:
                headers[name] = value
            elif name == "content-length":
                if headers[name] != value:
                    return parse_head_in_full(head, caller)
            else:
                headers[name] += ", " + value
    if last is not None and headers == last.headers and first == last[:4]:
        return last
    return tuple.__new__(Request, first + (headers, caller))


def known_request_line(line):
    """(method, path, query, version) of a valid HTTP/1.x request line, now known; else None."""
    match = REQUEST_LINE.fullmatch(line)
    if match is None:
        return None
    method, target, version = match.groups()
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        return None
    target = target.decode("latin-1")
    if target[0] == "/":  # split_target's origin form, inlined
        path, _, query = target.partition("?")
    else:
        path, query = split_target(target)
    first = (method.decode("ascii"), path, query, version)
    if len(line) <= MAX_KNOWN_LINE:
        if len(KNOWN_REQUEST_LINES) >= MAX_KNOWN:
            KNOWN_REQUEST_LINES.clear()
        KNOWN_REQUEST_LINES[line] = first
    return first


def known_field(line):
    """(lowercase name, trimmed value) of a valid header line, or NOT_READ for a field the
    daemon does not read, now known; else None."""
    match = FIELD_LINE.fullmatch(line)
    if match is None:
        return None
    if match.lastindex is None:
        field = NOT_READ
    else:
        name, _, value = line.partition(b":")
        field = (name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1"))
    if len(line) <= MAX_KNOWN_LINE:
        if len(KNOWN_FIELDS) >= MAX_KNOWN:
            KNOWN_FIELDS.clear()
        KNOWN_FIELDS[line] = field
    return field


def parse_head_in_full(head, caller=None):
    """parse_head for any head: one match checks it whole, one more finds its fields."""
    text = head[:-1] if head.endswith(b"\r") else head
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
        if b"\r" in text:
            raise HttpError(400, "Malformed request: a bare CR inside a line.")
    match = HEAD.fullmatch(text)
    if match is None:
        raise head_error(text)
    method, target, version, fields = match.groups()
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        raise HttpError(505, "Only HTTP/1.1 and HTTP/1.0 are supported.")
    headers = {}
    if fields:
        if fields.count(b"\n") > MAX_HEADER_LINES:
            raise HttpError(431, "Too many header lines (limit %d)." % MAX_HEADER_LINES)
        for name, value in HEADER_FIELD.findall(fields):
            key = name.decode("ascii").lower()
            if key not in READ_FIELDS:
                continue
            value = value.strip(b" \t").decode("latin-1")
            if key not in headers:
                headers[key] = value
            elif key == "content-length":
                if headers[key] != value:
                    raise HttpError(400, "Conflicting Content-Length headers.")
            else:
                headers[key] += ", " + value
    target = target.decode("latin-1")
    if target[0] == "/":  # split_target's origin form, inlined
        path, _, query = target.partition("?")
    else:
        path, query = split_target(target)
    return Request(method.decode("ascii"), path, query, version, headers, caller)


def head_error(text):
    """The error of a head that is not a request line and header lines, for its first fault."""
    lines = text.split(b"\n")
    request_line = REQUEST_LINE.fullmatch(lines[0])
    if not request_line:
        return HttpError(400, "Malformed request line.")
    if request_line.group(3) not in (b"HTTP/1.1", b"HTTP/1.0"):
        return HttpError(505, "Only HTTP/1.1 and HTTP/1.0 are supported.")
    if len(lines) - 1 > MAX_HEADER_LINES:
        return HttpError(431, "Too many header lines (limit %d)." % MAX_HEADER_LINES)
    return HttpError(400, "Malformed header line (obsolete line folding, a name with whitespace "
                          "or other characters not allowed in a name, or a control character "
                          "in a value).")


def split_target(target):
    """(path, query) of an origin-form or absolute-form request target. (known_request_line
    and parse_head_in_full take an origin-form target's path and query themselves: a call
    less per request.)"""
    if not target.startswith("/") and "://" in target:
        target = "/" + target.partition("://")[2].partition("/")[2]
    path, _, query = target.partition("?")
    return path, query


# ---- HTTP, framing: requests read off a socket, heads and bodies within limits ----

IDLE_TIMEOUT_S = 60.0
HEADER_TIMEOUT_S = 10.0
STREAM_SEND_TIMEOUT_S = 10.0
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 65536
MAX_BODY = 65536
MAX_CHUNK_LINE = 1024
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")


class ConnectionClosed(Exception):
    """The client closed the connection (or sent nothing while idle)."""


def end_of_head(buffer):
    """(end of the head, start of what follows) at the first empty line, or None."""
    bare = buffer.find(b"\n\n")
    crlf = buffer.find(b"\n\r\n")
    if bare < 0 and crlf < 0:
        return None
    if crlf < 0 or 0 <= bare < crlf:
        return bare, bare + 2
    return crlf, crlf + 3


def set_receive_timeout(sock, seconds):
    """The kernel's receive timeout (SO_RCVTIMEO; 0: none): a recv that waits longer fails with
    EAGAIN. Set once per connection, it costs nothing per request, where a Python-level socket
    timeout polls before every recv and send."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack(
        "ll", int(seconds), int(seconds % 1 * 1000000)))


# the timeouts every connection gets, packed once (SO_RCVTIMEO, SO_SNDTIMEO)
IDLE_TIMEVAL = struct.pack("ll", int(IDLE_TIMEOUT_S), int(IDLE_TIMEOUT_S % 1 * 1000000))
SEND_TIMEVAL = struct.pack("ll", int(STREAM_SEND_TIMEOUT_S),
                           int(STREAM_SEND_TIMEOUT_S % 1 * 1000000))


class RequestReader:
    """Reads requests off one connection: the head at its first empty line, then the body
    (Content-Length or chunked), discarded; HttpError for anything malformed or over a limit."""

    def __init__(self, sock, caller=None):
        self.sock = sock
        self.caller = caller
        self.buffer = b""
        self.deadline_set = False  # whether the receive timeout is a request's, not the idle one
        self.last_head = self.last_request = None

    def next_request(self):
        """The next Request, its body consumed; ConnectionClosed if the client goes or idles.
        A head the same, byte for byte, as the last one on this connection (a keep-alive
        client asking again) is the same Request, not parsed again (one that differs only in
        fields the daemon does not read is parsed, then is the same Request too). The socket
        waits with the kernel's receive timeout: the idle one between requests, a request's
        remaining time while a request comes in pieces."""
        buffer = self.buffer
        if not buffer:
            try:
                buffer = self.buffer = self.sock.recv(65536)
            except BlockingIOError:
                raise ConnectionClosed()
            if not buffer:
                raise ConnectionClosed()
        end = buffer.find(b"\n\r\n")
        if 0 < end < MAX_REQUEST_LINE and buffer[0] > 13 and \
                buffer.find(b"\n\n", 0, end + 1) < 0:
            # The usual case: a whole head, too short for any limit, ending at a CRLF line.
            head, self.buffer = buffer[:end], buffer[end + 3:]
        else:
            head = self.read_head()
        request = self.last_request
        if head != self.last_head:
            request = self.last_request = parse_head(head, self.caller, request)
            self.last_head = head
        headers = request.headers
        if "content-length" in headers or "transfer-encoding" in headers:
            self.drain_body(headers)
        if self.deadline_set:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, IDLE_TIMEVAL)
            self.deadline_set = False
        return request

    def receive(self, deadline):
        """Append what the client sends next to the buffer; 408 once the deadline passes."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HttpError(408, "Request not received in time (%d s)." % HEADER_TIMEOUT_S)
        set_receive_timeout(self.sock, max(remaining, 0.001))
        self.deadline_set = True
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            raise HttpError(408, "Request not received in time (%d s)." % HEADER_TIMEOUT_S)
        if not chunk:
            raise ConnectionClosed()
        self.buffer += chunk

    def read_head(self):
        buffer = self.buffer
        if not buffer or not buffer.lstrip(b"\r\n"):
            try:
                buffer = self.buffer = self.sock.recv(65536)
            except BlockingIOError:
                raise ConnectionClosed()
            if not buffer:
                raise ConnectionClosed()
        deadline = time.monotonic() + HEADER_TIMEOUT_S
        while True:
            buffer = self.buffer = self.buffer.lstrip(b"\r\n")
            line_end = buffer.find(b"\n")
            if line_end > MAX_REQUEST_LINE or (line_end < 0 and len(buffer) > MAX_REQUEST_LINE):
                raise HttpError(414, "Request line longer than %d bytes." % MAX_REQUEST_LINE)
            end = end_of_head(buffer)
            header_bytes = (end[0] if end else len(buffer)) - max(line_end, 0)
            if header_bytes > MAX_HEADER_BYTES:
                raise HttpError(431, "Request headers larger than %d bytes." % MAX_HEADER_BYTES)
            if end:
                self.buffer = buffer[end[1]:]
                return buffer[:end[0]]
            self.receive(deadline)

    def take(self, count, deadline):
        while len(self.buffer) < count:
            self.receive(deadline)
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def take_line(self, deadline):
        while b"\n" not in self.buffer[:MAX_CHUNK_LINE]:
            if len(self.buffer) >= MAX_CHUNK_LINE:
                raise HttpError(400, "Malformed chunked body: a line longer than %d bytes."
                                % MAX_CHUNK_LINE)
            self.receive(deadline)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line[:-1] if line.endswith(b"\r") else line

    def drain_body(self, headers):
        """Read and discard the request body (at most 64 KiB)."""
        length, encoding = headers.get("content-length"), headers.get("transfer-encoding")
        if length is None and encoding is None:
            return
        deadline = time.monotonic() + HEADER_TIMEOUT_S
        if encoding is not None:
            if length is not None:
                raise HttpError(400, "Content-Length and Transfer-Encoding together.")
            if encoding.lower() != "chunked":
                raise HttpError(400, "Unsupported transfer coding: only chunked.")
            self.expect_continue(headers)
            self.drain_chunks(deadline)
        elif length is not None:
            if not CONTENT_LENGTH.fullmatch(length):
                raise HttpError(400, "Invalid Content-Length.")
            if int(length) > MAX_BODY:
                raise HttpError(413, "Request body larger than %d bytes." % MAX_BODY)
            if int(length):
                self.expect_continue(headers)
                self.take(int(length), deadline)

    def drain_chunks(self, deadline):
        total = 0
        while True:
            size_text = self.take_line(deadline).split(b";")[0].strip(b" \t")
            if not CHUNK_SIZE.fullmatch(size_text):
                raise HttpError(400, "Malformed chunked body: bad chunk size.")
            size = int(size_text, 16)
            total += size
            if total > MAX_BODY:
                raise HttpError(413, "Request body larger than %d bytes." % MAX_BODY)
            if size == 0:
                while self.take_line(deadline):
                    pass
                return
            if self.take(size + 2, deadline)[size:] != b"\r\n":
                raise HttpError(400, "Malformed chunked body: chunk data not followed by CRLF.")

    def expect_continue(self, headers):
        if headers.get("expect", "").lower() == "100-continue":
            self.sock.sendall(CONTINUE)



# ---- HTTP, connection: who asks, and serving its requests one at a time, or a stream ----

LINGER_S = 2.0
MAX_LINGER_BYTES = 1 << 20


class Caller:
    """Who sent a request, as data for the API: `peer` as logged (`ip:port`, `uid=U pid=P`),
    the peer's uid, gid and pid over a Unix socket (SO_PEERCRED; None over TCP) and when the
    connection began (a process started later that has the pid is not the caller), and
    whether it is still connected."""

    __slots__ = ("peer", "uid", "gid", "pid", "connected", "sock", "abandon")
    GONE = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)

    def __init__(self, sock, address, abandon=None, unix=None):
        self.sock = sock
        self.abandon = abandon  # (device, DeviceError): answer from elsewhere, see BoundedCalls
        self.uid = self.gid = self.pid = self.connected = None
        if unix is None:
            unix = sock.family == socket.AF_UNIX
        if unix:
            self.pid, self.uid, self.gid = address if address else (None, None, None)
            self.connected = boot_ticks()
            self.peer = "unix" if self.uid is None else "uid=%d pid=%d" % (self.uid, self.pid)
        else:
            self.peer = "%s:%d" % (bracketed(address[0]), address[1])

    def gone(self):
        """Whether the client has closed the connection (asked without reading from it)."""
        poller = select.poll()
        poller.register(self.sock, self.GONE)
        return bool(poller.poll(0))


def peer_credentials(sock):
    """(pid, uid, gid) of a Unix socket's peer, or None where the kernel does not say."""
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   struct.calcsize("3i")))
    except OSError:
        return None


def bracketed(host):
    """An IPv6 host in brackets, as URLs and HOST:PORT strings want it; others as they are."""
    return "[%s]" % host if ":" in host else host


def linger(sock):
    """Close gracefully after an error: stop sending, then discard what the client still sends
    for a moment, so that it reads the error instead of a connection reset."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        received = 0
        while received < MAX_LINGER_BYTES and time.monotonic() < deadline:
            sock.settimeout(max(0.0, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return
            received += len(chunk)
    except OSError:
        pass


def described(request):
    """A request as its log line shows it: method, path and query, cut and escaped."""
    return escape_unprintable("%s %s%s" % (request.method, shown(request.path),
                                            "?" + shown(request.query) if request.query else ""))


def request_line(peer, user, request, status, seconds, reason):
    """A request's log line: who asked, what, the status, how long it took and why."""
    return "%s%s %s %d %.2fms%s" % (
        peer, " user=" + escape_unprintable(user) if user else "", described(request), status,
        seconds * 1000, ": " + escape_unprintable(reason) if reason else "")


class HttpConnection(socketserver.BaseRequestHandler):
    """One client connection: reads requests in turn, has the API answer each, and writes each
    answer in one write (or streams it)."""

    def __init__(self, request, client_address, server, slot=None):
        self.slot = slot  # given back early if the thread is left to a hung device
        socketserver.BaseRequestHandler.__init__(self, request, client_address, server)

    def setup(self):
        sock = self.sock = self.request
        unix = self.server.address_family == socket.AF_UNIX  # sock.family costs 3 calls
        self.caller = Caller(sock, self.client_address, self.abandon, unix)
        self.peer = self.caller.peer
        self.reader = RequestReader(sock, self.caller)
        self.api = self.server.api
        self.metrics = self.api.metrics
        self.counts = self.metrics.connection_opened()
        self.log_requests = log.isEnabledFor(logging.INFO)
        self.request = None
        if not unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, IDLE_TIMEVAL)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, SEND_TIMEVAL)

    def handle(self):
        try:
            while self.serve_one():
                pass
        except (OSError, ConnectionClosed, CallerGone):
            pass

    def finish(self):
        self.metrics.connection_closed(self.counts)

    def serve_one(self):
        """Read and answer one request; False when the connection is to be closed."""
        try:
            request = self.reader.next_request()
        except HttpError as err:
            self.sock.sendall(reply_bytes(error_reply(err), CLOSE))
            self.count("other", err.status)
            if self.log_requests:
                REQUEST_LINES.write(err.status, "%s - - %d: %s" % (
                    self.peer, err.status, escape_unprintable(err.message)))
            linger(self.sock)
            return False
        if request is not self.request:
            self.prepare(request)
        started = time.monotonic()
        result, user = self.api.handle(request)
        if result.__class__ is Stream:
            self.stream(result)
            status, keep_alive, reason = 200, False, None
        else:
            status, keep_alive, reason = result.status, self.keep_alive, result.reason
            body = result.body
            if result.headers or self.head_only:
                self.sock.sendall(reply_bytes(result, self.connection, self.head_only))
            else:  # reply_bytes's usual reply, without its call
                self.sock.sendall(b"%sContent-Length: %d\r\n%s\r\n%s" % (
                    (JSON_HEADS if body else PLAIN_HEADS)[status], len(body), self.connection,
                    body))
        key = (self.counted_path, status)  # count(), inlined
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.log_requests and REQUEST_LINES.admit(status, started):
            REQUEST_LINES.emit(request_line(self.peer, user, self.request, status,
                                            time.monotonic() - started, reason))
        return keep_alive

    def prepare(self, request):
        """What the answers to a request depend on besides the API's reply, worked out once for
        each new request (a keep-alive client repeating itself gets the same Request): whether
        the connection stays open and the path it is counted under."""
        self.request = request
        tokens = request.headers.get("connection")
        if request.version == b"HTTP/1.1":
            self.keep_alive = tokens is None or "close" not in tokens.lower()
            self.connection = b"" if self.keep_alive else CLOSE
        else:
            self.keep_alive = tokens is not None and "keep-alive" in tokens.lower()
            self.connection = KEEP_ALIVE if self.keep_alive else CLOSE
        self.head_only = request.method == "HEAD"
        self.counted_path = request.path if request.path in self.metrics.paths else "other"

    def count(self, path, status):
        """Count a request for /metrics, in this connection's own counts (no lock). (serve_one
        counts the usual request itself, on its hot path.)"""
        self.counts[path, status] = self.counts.get((path, status), 0) + 1

    def abandon(self, device, error):
        """The device call this connection's thread makes has hung (see BoundedCalls): answer
        its request from here, close the connection and give its slot back; the thread is
        left to the device."""
        reply = errors_reply({device: error})
        try:
            self.sock.send(reply_bytes(reply, CLOSE), socket.MSG_DONTWAIT)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.slot is not None:
            self.slot.release()
        self.count(self.counted_path, reply.status)
        if self.log_requests:
            REQUEST_LINES.write(reply.status, "%s %s %d: %s (answered for the thread left to "
                                              "the device)" % (self.peer, described(self.request),
                                                               reply.status, reply.reason))

    def stream(self, stream):
        """Server-Sent Events: the current values, then every change, until either side ends.

        The sampler's thread writes the events; this thread waits on the socket, so a client
        that goes away is noticed at once and the thread ends.
        """
        sampler, sock = stream.sampler, self.sock
        subscriber = SseSubscriber(sock, stream.ids, stream.per_device, sampler.kind)
        first = sampler.fresh()
        sock.sendall(SSE_HEAD + (subscriber.events(first) if first is not None else b""))
        set_receive_timeout(sock, 0)
        self.server.stream_started()
        try:
            if sampler.add_stream(subscriber):
                while sock.recv(4096):
                    pass
        except OSError:
            pass
        finally:
            sampler.remove_stream(subscriber)
            subscriber.close()
            self.server.stream_ended()



# ==== Programs: the servers, the commands that ask a daemon, the command line, main ====

# ---- Connection limits: the connection cap, each client's fair share, a thread per connection ----

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BACKOFF_S = 0.1
REJECT_LINGER_S = 1.0
MAX_REJECTED_PENDING = 1024


class Rejecter:
    """Answers connections beyond the cap without a thread each and without delaying the
    accept loop: the 503 goes out at once (non-blocking), then one thread drains what each
    client still sends (epoll, any descriptor number) for a moment, so that it reads the 503
    rather than a reset, and closes it. A background worker: start() starts its thread, stop()
    ends it."""

    def __init__(self):
        self.epoll = select.epoll()
        self.pending = collections.OrderedDict()  # fd -> (socket, deadline), oldest first
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.stopped = False

    def start(self):
        threading.Thread(target=self.run, name="rejecter", daemon=True).start()

    def stop(self):
        with self.lock:
            self.stopped = True
            self.arrived.notify()

    def reject(self, sock, answer):
        try:
            sock.setblocking(False)
            sock.send(answer)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self.lock:
            if len(self.pending) >= MAX_REJECTED_PENDING:
                self.forget(next(iter(self.pending)))
            fd = sock.fileno()
            self.pending[fd] = (sock, time.monotonic() + REJECT_LINGER_S)
            self.epoll.register(fd, select.EPOLLIN)
            self.arrived.notify()

    def forget(self, fd):
        """Close a pending connection (the caller holds the lock)."""
        sock, _ = self.pending.pop(fd)
        self.epoll.unregister(fd)
        sock.close()

    def run(self):
        while True:
            with self.lock:
                while not self.pending and not self.stopped:
                    self.arrived.wait()
                if self.stopped:
                    return
                wait = max(0.0, next(iter(self.pending.values()))[1] - time.monotonic())
            events = self.epoll.poll(min(wait, REJECT_LINGER_S))
            with self.lock:
                for fd, _ in events:
                    if fd in self.pending and not self.drained(self.pending[fd][0]):
                        self.forget(fd)
                now = time.monotonic()
                for fd in [fd for fd, (_, deadline) in self.pending.items() if deadline <= now]:
                    self.forget(fd)

    @staticmethod
    def drained(sock):
        """Read what the client sent; False once it has closed (or failed)."""
        try:
            return bool(sock.recv(65536))
        except BlockingIOError:
            return True
        except OSError:
            return False


class Slot:
    """A connection's place under the cap and in its client's share, given back once: when its
    thread ends, or earlier when its thread is left to a hung device."""

    __slots__ = ("server", "client", "held")

    def __init__(self, server, client):
        self.server = server
        self.client = client
        self.held = True

    def release(self):
        server = self.server
        with server.count_lock:
            if not self.held:
                return
            self.held = False
            server.active -= 1
            if self.client is not None:
                server.by_client[self.client] -= 1
                if not server.by_client[self.client]:
                    del server.by_client[self.client]


class ConnectionCap(socketserver.ThreadingMixIn):
    """One daemon thread per connection, at most max_connections; the next is answered 503.
    Out of descriptors, the accept loop backs off instead of spinning."""

    daemon_threads = True
    request_queue_size = 1024

    def setup_cap(self, api, max_connections, per_client):
        self.api = api
        self.max_connections = max_connections
        self.per_client = per_client
        self.active = 0
        self.by_client = collections.Counter()  # uid (UDS) or IP (TCP) -> open connections
        self.streams = 0
        self.out_of_descriptors = False
        self.rejected = 0
        self.last_rejection_log = float("-inf")
        self.count_lock = threading.Lock()
        self.streams_done = threading.Condition(self.count_lock)
        self.rejecter = Rejecter()
        self.rejecter.start()
        self.stopping = False
        self.stopped_accepting = threading.Event()
        self.wake_read, self.wake_write = os.pipe()

    def get_request(self):
        try:
            accepted = self.socket.accept()
        except OSError as err:
            if err.errno in OUT_OF_DESCRIPTORS:
                if not self.out_of_descriptors:
                    self.out_of_descriptors = True
                    log.error("cannot accept connections: %s; retrying every %.1f s until "
                              "descriptors are free", os.strerror(err.errno), ACCEPT_BACKOFF_S)
                time.sleep(ACCEPT_BACKOFF_S)
            raise
        if self.out_of_descriptors:
            self.out_of_descriptors = False
            log.info("accepting connections again")
        return accepted

    def client_of(self, request, client_address):
        """(the address the handler gets, the client's key for its fair share or None)."""
        if self.address_family != socket.AF_UNIX:  # request.family costs 3 calls
            return client_address, client_key(client_address[0])
        credentials = peer_credentials(request)
        return credentials, (credentials[1] if credentials and credentials[1] != 0 else None)

    def process_request(self, request, client_address):
        """Serve the connection on a thread of its own if the cap and the client's share allow,
        else reject it."""
        client_address, client = self.client_of(request, client_address)
        with self.count_lock:
            admitted = self.active < self.max_connections
            fair = client is None or self.by_client[client] < self.per_client
            if admitted and fair:
                self.active += 1
                if client is not None:
                    self.by_client[client] += 1
        if admitted and fair:
            slot = Slot(self, client)
            try:
                threading.Thread(target=self.serve_counted,
                                 args=(request, client_address, slot), daemon=True).start()
                return
            except RuntimeError:
                slot.release()
        over_share = admitted and not fair
        self.rejecter.reject(request, TOO_MANY_FROM_CLIENT if over_share else TOO_MANY_CONNECTIONS)
        self.rejected += 1
        now = time.monotonic()
        if now - self.last_rejection_log >= 1.0:
            log.warning("refused %d connection(s): %s", self.rejected,
                        "client %s has %d connections open (--max-connections-per-client)"
                        % (client, self.per_client) if over_share else
                        "%d connections open (--max-connections)" % self.max_connections)
            self.rejected, self.last_rejection_log = 0, now

    def serve_counted(self, request, client_address, slot):
        try:
            HttpConnection(request, client_address, self, slot)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slot.release()

    def handle_error(self, request, client_address):
        log.exception("error on a connection")

    def server_close(self):
        self.rejecter.stop()
        super().server_close()

    def accept_until_stopped(self):
        """Accept connections until stop_accepting(): asleep on the listening socket and a
        wake-up pipe, so an idle daemon does not wake, and a stop is at once."""
        poller = select.poll()
        poller.register(self.socket, select.POLLIN)
        poller.register(self.wake_read, select.POLLIN)
        while not self.stopping:
            for fd, _ in poller.poll():
                if fd == self.socket.fileno() and not self.stopping:
                    self._handle_request_noblock()
        self.stopped_accepting.set()

    def stop_accepting(self):
        """Stop the accept loop; it has stopped when this returns."""
        self.stopping = True
        os.write(self.wake_write, b"s")
        self.stopped_accepting.wait()

    def stream_started(self):
        with self.count_lock:
            self.streams += 1

    def stream_ended(self):
        with self.count_lock:
            self.streams -= 1
            self.streams_done.notify_all()

    def wait_for_streams(self, timeout):
        deadline = time.monotonic() + timeout
        with self.count_lock:
            while self.streams and time.monotonic() < deadline:
                self.streams_done.wait(deadline - time.monotonic())



# ---- Servers: TCP and Unix-socket listeners, the socket file made safely, the file limit ----

FILE_LIMIT_HEADROOM = 64 + MAX_REJECTED_PENDING


class TcpServer(ConnectionCap, socketserver.TCPServer):
    """The API on a TCP address, IPv4 or IPv6."""

    allow_reuse_address = True

    def __init__(self, family, address, api, max_connections, per_client):
        self.address_family = family
        self.setup_cap(api, max_connections, per_client)
        socketserver.TCPServer.__init__(self, address, HttpConnection)

    def describe(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % (bracketed(host), port)


class UnixServer(ConnectionCap, socketserver.UnixStreamServer):
    """The API on a Unix socket that has its final mode and owner before it listens."""

    def __init__(self, path, permissions, uid, gid, api, max_connections, per_client):
        self.path = path
        self.permissions = permissions
        self.owner = (-1 if uid is None else uid, -1 if gid is None else gid)
        self.setup_cap(api, max_connections, per_client)
        socketserver.UnixStreamServer.__init__(self, path, HttpConnection)

    def server_bind(self):
        self.inode = bind_unix_socket(self.socket, self.path, self.permissions, self.owner)

    def describe(self):
        return "unix:%s (mode %03o)" % (self.path, self.permissions)

    def remove_socket(self):
        """Unlink the socket file if it is still the one this server created."""
        try:
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass


def bind_unix_socket(sock, path, mode, owner):
    """Bind sock at path with its final mode and owner; the socket's inode.

    The socket is made in a fresh private directory beside path, reached through a descriptor
    of that directory (never by a name someone could swap), given its mode and owner there,
    and renamed into place: no other file can ever have its mode or owner changed.
    """
    parent, name = os.path.split(os.path.abspath(path))
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    private_name = os.path.basename(tempfile.mkdtemp(prefix=".zeusd-", dir=parent))
    try:
        private_fd = os.open(private_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=parent_fd)
        try:
            private = os.fstat(private_fd)
            if private.st_uid != os.geteuid() or private.st_mode & 0o077:
                raise OSError(errno.EPERM, "the private directory %s/%s was tampered with"
                              % (parent, private_name))
            through_fd = "/proc/self/fd/%d/%s" % (private_fd, name)
            umask = os.umask(0o077)
            try:
                sock.bind(through_fd if os.path.isdir("/proc/self/fd") else
                          os.path.join(parent, private_name, name))
            finally:
                os.umask(umask)
            os.chmod(name, mode, dir_fd=private_fd)
            if owner != (-1, -1):
                os.chown(name, owner[0], owner[1], dir_fd=private_fd, follow_symlinks=False)
            inode = os.stat(name, dir_fd=private_fd, follow_symlinks=False).st_ino
            os.rename(name, name, src_dir_fd=private_fd, dst_dir_fd=parent_fd)
            return inode
        finally:
            os.close(private_fd)
    finally:
        try:
            os.rmdir(private_name, dir_fd=parent_fd)
        except OSError:
            pass
        os.close(parent_fd)


def claim_socket_path(path):
    """Make path free for a new socket: remove a dead socket, refuse a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError("%s exists and is not a socket; leaving it alone. Remove it or choose "
                           "another --socket-path" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed the stale socket %s", path)
        return
    except OSError as err:
        raise StartupError("cannot check the existing socket %s: %s" % (path, err))
    finally:
        probe.close()
    raise StartupError("another daemon is listening on %s; stop it first, or choose another "
                       "--socket-path" % path)


def lock_socket_path(path):
    """An exclusive lock on `.<name>.lock` beside the socket, held for the daemon's life, so
    that of two daemons started at once on one path exactly one goes on to serve."""
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StartupError("cannot create the socket %s: directory %s does not exist"
                           % (path, parent))
    lock_path = os.path.join(parent, "." + name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise StartupError("cannot create the lock file %s for the socket %s: %s"
                           % (lock_path, path, err.strerror or err))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StartupError("the lock file %s is not a regular file" % lock_path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StartupError("another daemon is listening on %s (or starting on it); stop it "
                           "first, or choose another --socket-path" % path)
    except StartupError:
        os.close(fd)
        raise
    return fd


def make_default_directory(path, default):
    """Create /run/zeusd (0755) when path (the socket's or the state directory's) is its
    default, default, and /run/zeusd is missing."""
    parent = os.path.dirname(path)
    if path == default and not os.path.isdir(parent):
        try:
            os.mkdir(parent, 0o755)
            os.chmod(parent, 0o755)
        except FileExistsError:
            pass
        except OSError as err:
            raise StartupError("cannot create %s for %s: %s"
                               % (parent, path, err.strerror or err))


def closed_directory(path, mode):
    """(directory, mode) of the first directory on a socket's path that keeps out the others
    whom the socket's mode lets in, or None."""
    if not mode & 0o006:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            info = os.stat(directory)
        except OSError:
            return None
        if not info.st_mode & 0o001:
            return directory, stat.S_IMODE(info.st_mode)
        if directory == os.path.dirname(directory):
            return None
        directory = os.path.dirname(directory)


def open_server(args, api):
    per_client = args.max_connections_per_client or max(1, args.max_connections // 4)
    if args.mode == "uds":
        make_default_directory(args.socket_path, DEFAULT_SOCKET_PATH)
        lock_fd = lock_socket_path(args.socket_path)
        claim_socket_path(args.socket_path)
        try:
            server = UnixServer(args.socket_path, args.socket_permissions, args.socket_uid,
                                args.socket_gid, api, args.max_connections, per_client)
        except OSError as err:
            raise StartupError("cannot listen on %s: %s" % (args.socket_path, err))
        server.lock_fd = lock_fd  # held, never closed: the lock lasts as long as the daemon
        closed = closed_directory(args.socket_path, args.socket_permissions)
        if closed is not None:
            log.warning("the socket %s is mode %03o, but the directory %s on its path is mode "
                        "%04o: users outside its owner and group cannot reach the socket (chmod "
                        "o+x %s, or another --socket-path)", args.socket_path,
                        args.socket_permissions, closed[0], closed[1], closed[0])
        return server
    host, port = args.tcp_bind_address
    shown_address = "%s:%d" % (bracketed(host), port)
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        return TcpServer(family, address, api, args.max_connections, per_client)
    except OSError as err:
        raise StartupError("cannot listen on %s: %s" % (shown_address, err.strerror or err))


def raise_file_limit(wanted):
    """Raise the soft open-file limit towards wanted, so the connection cap can be reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            target = soft
        if target < wanted:
            log.warning("open-file limit %d is below --max-connections plus headroom (%d)",
                        target, wanted)



# ---- Daemon client: a running daemon's answers, read within bounds, for the commands ----

STATUS_TIMEOUT_S = 10.0  # the default for everything one table needs
STATUS_MAX_HEAD = 65536
STATUS_MAX_BODY = 1 << 20
STREAM_SILENCE_S = 20.0  # a stream quiet for longer than this (keep-alives come every 15 s) is lost
# what reading an answer of an unexpected shape raises: one line, never a traceback
SHAPE_ERRORS = (TypeError, KeyError, AttributeError, ValueError, IndexError, UnicodeError)


class StatusError(Exception):
    """The daemon could not be reached or refused; main prints it on one line and exits 1."""


def printable(value, limit=200):
    """Text from the daemon as it may reach a terminal: printable characters only (no escape
    sequences: no clipboard writes, title changes or screen clears), shown() within limit."""
    return shown("".join(char if char.isprintable() else "?" for char in str(value)[:limit + 1]),
                 limit)


class HttpReader:
    """Reads one HTTP/1.1 response off a socket within bounds: a head of at most 64 KiB, a body
    of at most 1 MiB, every read before the deadline (a monotonic time, or None for streams,
    whose lines are then read within STREAM_SILENCE_S)."""

    def __init__(self, sock, where, deadline):
        self.sock = sock
        self.where = where
        self.deadline = deadline
        self.buffer = b""

    def fill(self):
        timeout = STREAM_SILENCE_S if self.deadline is None else \
            self.deadline - time.monotonic()
        if timeout <= 0:
            raise StatusError("the daemon at %s did not answer in time" % self.where)
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise StatusError("the daemon at %s did not answer in time" % self.where)
        except OSError as err:
            raise StatusError("lost the connection to %s: %s" % (self.where,
                                                                  err.strerror or err))
        if not chunk:
            raise StatusError("the daemon at %s closed the connection" % self.where)
        self.buffer += chunk

    def until(self, separator, limit, what):
        while separator not in self.buffer:
            if len(self.buffer) > limit:
                raise StatusError("the daemon at %s sent %s longer than %d bytes"
                                  % (self.where, what, limit))
            self.fill()
        data, _, self.buffer = self.buffer.partition(separator)
        return data

    def head(self):
        """(status, {lower-case name: value}) of the response."""
        lines = self.until(b"\r\n\r\n", STATUS_MAX_HEAD, "a response head").decode(
            "latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not DIGITS.fullmatch(parts[1]):
            raise StatusError("the daemon at %s sent no HTTP response" % self.where)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def body(self, headers):
        length = headers.get("content-length", "")
        if not CONTENT_LENGTH.fullmatch(length) or int(length) > STATUS_MAX_BODY:
            raise StatusError("the daemon at %s sent a body of %s bytes; at most %d are read"
                              % (self.where, printable(length, 20) or "unknown", STATUS_MAX_BODY))
        while len(self.buffer) < int(length):
            self.fill()
        return self.buffer[:int(length)]

    def line(self):
        return self.until(b"\n", STATUS_MAX_HEAD, "a stream line").rstrip(b"\r")


class DaemonClient:
    """GET requests to a daemon over its Unix socket or TCP, with an optional token; each
    answer read within bounds and the deadline it is given."""

    def __init__(self, socket_path, tcp_address, token, timeout=STATUS_TIMEOUT_S):
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        self.token = token
        self.timeout = timeout
        self.where = ("http://%s:%d" % (bracketed(tcp_address[0]), tcp_address[1])
                      if tcp_address else "unix:" + socket_path)
        self.server = "?"

    def connect(self, deadline):
        try:
            if self.tcp_address:
                sock = socket.create_connection(self.tcp_address,
                                                max(0.1, deadline - time.monotonic()))
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    sock.connect(self.socket_path)
                except OSError:
                    sock.close()
                    raise
        except PermissionError:
            raise StatusError(self.permission_denied())
        except OSError as err:
            raise StatusError("cannot reach the daemon at %s: %s"
                              % (self.where, err.strerror or err))
        return sock

    def permission_denied(self):
        """Why the socket may not be opened: its mode and group, and what to ask for."""
        try:
            info = os.stat(self.socket_path)
        except OSError:
            return ("permission denied on %s: a directory on its path is not searchable by you"
                    % self.where)
        try:
            group = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            group = str(info.st_gid)
        return ("permission denied on %s (mode %04o, group '%s'): ask to be added to group '%s', "
                "or have the daemon started with --socket-permissions 666"
                % (self.where, info.st_mode & 0o7777, group, group))

    def open(self, path, deadline, method="GET"):
        """(status, headers, reader) of the request, the connection left open for the body."""
        sock = self.connect(deadline)
        reader = HttpReader(sock, self.where, deadline)
        try:
            sock.sendall(("%s %s HTTP/1.1\r\nHost: zeusd\r\nConnection: close\r\n%s\r\n" % (
                method, path, "Authorization: Bearer %s\r\n" % self.token if self.token else "")
            ).encode("latin-1"))
            status, headers = reader.head()
        except OSError as err:
            sock.close()
            raise StatusError("lost the connection to %s: %s" % (self.where, err.strerror or err))
        except StatusError:
            sock.close()
            raise
        self.server = printable(headers.get("server", "?"), 40)
        return status, headers, reader

    def get(self, path, deadline, method="GET"):
        """The JSON answer to GET (or method) path; StatusError naming the daemon's error
        otherwise."""
        status, headers, reader = self.open(path, deadline, method)
        try:
            body = reader.body(headers)
        finally:
            reader.sock.close()
        try:
            value = json.loads(body.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            value = None
        if status != 200:
            message = value.get("error") or value.get("errors") if isinstance(value, dict) \
                else body[:200].decode("utf-8", "replace")
            raise StatusError("%s answered %d to %s %s: %s" % (self.where, status, method, path,
                                                               printable(message)))
        if not isinstance(value, dict):
            raise StatusError("%s answered %s %s with something other than a JSON object"
                              % (self.where, method, path))
        return value

    def get_or_none(self, path, deadline, notes):
        """The JSON answer, or None with the reason added to notes."""
        try:
            return self.get(path, deadline)
        except StatusError as err:
            notes.append(str(err))
            return None


def listed(value):
    return value if isinstance(value, list) else []


def emit(text):
    """Write to stdout what its encoding can carry, the rest replaced."""
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout.write(text.encode(encoding, "replace").decode(encoding))


def client_of_args(args):
    """The DaemonClient that --socket-path or --tcp, --token and --timeout name (else
    $ZEUSD_SOCK_PATH or the default socket, $ZEUSD_TOKEN)."""
    token = args.token or os.environ.get("ZEUSD_TOKEN")
    socket_path = args.socket_path or os.environ.get("ZEUSD_SOCK_PATH") or DEFAULT_SOCKET_PATH
    return DaemonClient(socket_path, args.tcp, token, args.timeout)



# ---- Status: `zeusd status`, a terminal view of a running daemon's devices ----

RECONNECT_S = 1.0
CLEAR_SCREEN = "\x1b[H\x1b[J"


def node_status(client, streams=None):
    """(GPUs, CPUs, readings by kind, notes) of the node, within the client's timeout. The GPUs
    are those the token may see. Power comes from the streams when given (None for a device
    that failed or a stream that is lost), else from one get_power each."""
    deadline = time.monotonic() + client.timeout
    discovery, notes = client.get("/discover", deadline), []
    gpus, cpus = listed(discovery.get("gpus")), listed(discovery.get("cpus"))
    for device in gpus + cpus:
        if not isinstance(device, dict):
            raise StatusError("the daemon at %s listed a device that is not a JSON object"
                              % client.where)
        if type(device.get("id")) is not int or not 0 <= device["id"] <= U32_MAX:
            raise StatusError("the daemon at %s named a device %s, which is not a device index"
                              % (client.where, printable(json.dumps(device.get("id")), 40)))
    if discovery.get("auth_required"):
        if not client.token:
            raise StatusError("the daemon at %s requires a token: set ZEUSD_TOKEN (or pass "
                              "--token)" % client.where)
        whoami = client.get("/auth/whoami", deadline)
        allowed, scopes = whoami.get("gpus"), listed(whoami.get("scopes"))
        if isinstance(allowed, list):
            gpus = [gpu for gpu in gpus if gpu.get("id") in allowed]
        unreadable = [(kind, group) for kind, group, devices in (
            ("GPUs", "gpu-read", gpus), ("CPUs", "cpu-read", cpus))
            if devices and group not in scopes]
        for kind, group in unreadable:
            notes.append("the token has no '%s' scope: %s not shown" % (group, kind))
        gpus = [] if ("GPUs", "gpu-read") in unreadable else gpus
        cpus = [] if ("CPUs", "cpu-read") in unreadable else cpus
    readings = {"gpu": {}, "cpu": {}}
    if gpus:
        ids = ",".join(str(gpu.get("id")) for gpu in gpus)
        answer = client.get_or_none("/gpu/get_power?gpu_ids=" + ids, deadline, notes) or {}
        power = answer.get("power_mw") or {}
        if streams and streams.get("gpu"):
            power = streams["gpu"].current(power)
        with_energy = [str(g.get("id")) for g in gpus if g.get("cumulative_energy_available")]
        energy = (client.get_or_none("/gpu/get_cumulative_energy?gpu_ids=" + ",".join(
            with_energy), deadline, notes) or {}) if with_energy else {}
        limits = client.get_or_none("/gpu/get_power_limit?gpu_ids=" + ids, deadline,
                                    notes) or {}
        holds = client.get_or_none("/gpu/holds?gpu_ids=" + ids, deadline, []) or {}
        for gpu in gpus:
            key = str(gpu.get("id"))
            readings["gpu"][key] = (power.get(key), (energy.get(key) or {}).get("energy_mj"),
                                    (limits.get(key) or {}).get("power_limit_mw"),
                                    holder(holds.get(key)))
    if cpus:
        answer = client.get_or_none("/cpu/get_power", deadline, notes) or {}
        power = answer.get("power_mw") or {}
        if streams and streams.get("cpu"):
            power = streams["cpu"].current(power)
        energy = client.get_or_none("/cpu/get_cumulative_energy?cpu=true&dram=true", deadline,
                                    notes) or {}
        for cpu in cpus:
            key = str(cpu.get("id"))
            readings["cpu"][key] = (power.get(key) or {}, energy.get(key) or {})
    return gpus, cpus, readings, notes


def status_text(client, streams=None):
    """The node's table; an answer of a shape this client does not expect is a StatusError
    (one line), never a traceback."""
    try:
        return status_table(client, *node_status(client, streams))
    except SHAPE_ERRORS as err:
        raise StatusError("the daemon at %s answered in a shape this client does not expect "
                          "(%s: %s)" % (client.where, type(err).__name__, printable(err, 100)))


def holder(hold):
    """Who holds a GPU, as the status table shows it."""
    if not isinstance(hold, dict):
        return "-"
    if hold.get("uid") is not None:
        sessions = hold.get("sessions")
        return "uid %s%s%s" % (hold["uid"], " %s" % hold["user"] if hold.get("user") else "",
                               " (session %s)" % sessions[0] if sessions else "")
    return "user '%s'" % hold.get("user")


def scaled(value, divisor, width):
    return ("%*.1f" % (width, value / divisor)) if type(value) in (int, float) \
        else "%*s" % (width, "-")


def status_table(client, gpus, cpus, readings, notes):
    lines = ["%s at %s  %s" % (client.server, printable(client.where),
                               time.strftime("%Y-%m-%d %H:%M:%S"))]
    if gpus:
        lines.append("%-4s %-28s %9s %13s %9s  %s" % ("GPU", "NAME", "POWER W", "ENERGY J",
                                                       "LIMIT W", "HOLDER"))
        for gpu in gpus:
            power, energy, limit, held_by = readings["gpu"][str(gpu.get("id"))]
            lines.append("%-4s %-28s %s %s %s  %s" % (
                printable(gpu.get("id"), 4), printable(gpu.get("name", "?"), 28),
                scaled(power, 1000.0, 9), scaled(energy, 1000.0, 13), scaled(limit, 1000.0, 9),
                printable(held_by, 60)))
    if cpus:
        lines.append("%-4s %-12s %9s %9s %13s %13s" % ("CPU", "ZONE", "POWER W", "DRAM W",
                                                         "ENERGY J", "DRAM J"))
        for cpu in cpus:
            power, energy = readings["cpu"][str(cpu.get("id"))]
            lines.append("%-4s %-12s %s %s %s %s" % (
                printable(cpu.get("id"), 4), printable(cpu.get("name", "?"), 12),
                scaled(power.get("cpu_mw"), 1000.0, 9), scaled(power.get("dram_mw"), 1000.0, 9),
                scaled(energy.get("cpu_energy_uj"), 1e6, 13),
                scaled(energy.get("dram_energy_uj"), 1e6, 13)))
    if not gpus and not cpus:
        lines.append("no GPUs or CPUs served")
    lines.extend("note: " + printable(note, 300) for note in notes)
    return "\n".join(lines) + "\n"


class StreamFollower:
    """Keeps the latest power of every device from a daemon's stream (either event shape), on a
    thread that reconnects when the stream is lost (the daemon restarted, say)."""

    def __init__(self, client, path, id_key, value_of):
        self.client = client
        self.path = path
        self.id_key = id_key
        self.value_of = value_of
        self.latest = {}
        self.connected = False
        threading.Thread(target=self.follow, name="status-stream", daemon=True).start()

    def follow(self):
        while True:
            try:
                status, _, reader = self.client.open(self.path,
                                                     time.monotonic() + self.client.timeout)
                if status == 200:
                    reader.deadline = None
                    self.connected = True
                    self.read_events(reader)
                else:
                    reader.sock.close()
            except StatusError:
                pass
            self.connected = False
            self.latest = {}
            time.sleep(RECONNECT_S)

    def read_events(self, reader):
        try:
            while True:
                line = reader.line()
                if not line.startswith(b"data: "):
                    continue
                try:
                    event = json.loads(line[6:].decode("utf-8", "replace"))
                except (ValueError, RecursionError):
                    continue
                if not isinstance(event, dict):
                    continue
                if self.id_key in event:
                    self.latest[str(event[self.id_key])] = self.value_of(event)
                elif isinstance(event.get("power_mw"), dict):
                    self.latest = dict(self.latest, **event["power_mw"])
        finally:
            reader.sock.close()

    def current(self, answered):
        """The streamed values of the devices that one get_power just answered for: a device it
        names as failing, or every device while the stream is lost, has no value."""
        if not self.connected:
            return {}
        return {key: value for key, value in self.latest.items() if key in answered}


def status(args):
    """Print the node's table once, or redraw it every --watch seconds from the streams."""
    client = client_of_args(args)
    if args.watch is None:
        emit(status_text(client))
        return 0
    streams = {
        "gpu": StreamFollower(client, "/gpu/stream_power", "gpu_id",
                              lambda event: event.get("power_mw")),
        "cpu": StreamFollower(client, "/cpu/stream_power", "cpu_id", lambda event: {
            "cpu_mw": event.get("cpu_mw"), "dram_mw": event.get("dram_mw")})}
    clear = CLEAR_SCREEN if sys.stdout.isatty() else "\n"
    try:
        while True:
            try:
                table = status_text(client, streams)
            except StatusError as err:
                table = "%s  %s\n%s; retrying every %g s\n" % (
                    printable(client.where), time.strftime("%Y-%m-%d %H:%M:%S"),
                    printable(err, 300), args.watch)
            emit(clear + table)
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0



# ---- Release and receipts: `zeusd release` and `zeusd receipts`, what ended holds used ----

SINCE_FORMS = ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M",
               "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")


def release(args):
    """`zeusd release`: end the caller's holds (of --gpus, else all it may release); print
    what each ended hold had saved and put back, and its energy."""
    client = client_of_args(args)
    path = "/gpu/release" + ("?gpu_ids=" + ",".join(map(str, args.gpus)) if args.gpus else "")
    try:
        receipts = client.get(path, time.monotonic() + client.timeout, "POST")
        lines = [receipt_row(receipt) for _, receipt in sorted(
            receipts.items(), key=lambda item: int(item[0]) if DIGITS.fullmatch(item[0]) else -1)]
    except SHAPE_ERRORS as err:
        raise StatusError("the daemon at %s answered in a shape this client does not expect "
                          "(%s: %s)" % (client.where, type(err).__name__, printable(err, 100)))
    emit("\n".join(lines) + "\n" if lines else "nothing to release: no GPU%s held by you\n"
         % (" of " + ",".join(map(str, args.gpus)) if args.gpus else ""))
    return 0


def receipt_row(receipt):
    """One ended hold on one line: the GPU, what was put back, who held it, when, its
    energy."""
    saved = receipt.get("saved") or {}
    persistence = saved.get("persistence_mode")
    times = [iso_time(receipt[key]) if type(receipt.get(key)) is int else "?"
             for key in ("since_ms", "until_ms")]
    energy = receipt.get("energy_j")
    return "GPU %s: %s power_limit_mw=%s persistence=%s clocks=reset (%s); held by %s%s from %s " \
           "to %s: %s" % (
               printable(receipt.get("gpu"), 10),
               "restored" if receipt.get("restore") == "ok" else printable(receipt.get("restore"),
                                                                           200),
               printable(saved.get("power_limit_mw"), 12),
               "-" if persistence is None else int(bool(persistence)),
               printable(receipt.get("reason"), 20), printable(holder(receipt), 60),
               ", job %s" % printable(receipt["job"], 20) if receipt.get("job") else "",
               times[0], times[1], "%.3f J" % energy if type(energy) in (int, float) else
               "energy unknown (%s)" % printable(receipt.get("energy_note"), 100))


def since_arg(text):
    """--since as ms since the epoch: a UTC date or time (2026-12-01, 2026-12-01T21:04:05Z),
    or a duration ago (2h, 7d); never in the future."""
    for form in SINCE_FORMS:
        try:
            seconds = calendar.timegm(time.strptime(text.strip(), form))
            break
        except ValueError:
            continue
    else:
        try:
            seconds = time.time() - (parse_duration(text) or float("nan"))
        except ValueError:
            seconds = float("nan")
        if seconds != seconds:
            raise argparse.ArgumentTypeError(
                "invalid value '%s': expected a UTC date or time such as 2026-12-01 or "
                "2026-12-01T21:04:05Z, or a time ago such as 2h or 7d" % printable(text, 40))
    if seconds > time.time():
        raise argparse.ArgumentTypeError("'%s' is in the future" % printable(text, 40))
    return int(seconds * 1000)


def receipts(args):
    """`zeusd receipts`: the receipts on file that match, one line each and a total per GPU;
    or JSON lines; or one summary line for a job record. Read as they come, never whole."""
    totals = {}  # gpu -> [joules, holds]
    if not os.path.isdir(args.state_dir):
        raise StatusError("%s is not a directory: give the daemon's --state-dir"
                          % printable(args.state_dir))
    try:
        for line in receipt_lines(args.state_dir):
            try:
                receipt = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
            if not isinstance(receipt, dict) or not receipt_matches(receipt, args):
                continue
            if args.json:
                emit(json.dumps(receipt) + "\n")
            elif not args.summary:
                emit(receipt_row(receipt) + "\n")
            energy = receipt.get("energy_j")
            total = totals.setdefault(printable(receipt.get("gpu"), 10), [0.0, 0, 0])
            known = type(energy) in (int, float)
            total[0] += energy if known else 0.0
            total[1] += 1
            total[2] += known
    except OSError as err:
        raise StatusError("cannot read the receipts in %s: %s"
                          % (args.state_dir, err.strerror or err))
    ordered = sorted(totals.items(), key=lambda item: (len(item[0]), item[0]))
    if args.summary:
        emit("gpu_energy_j=%s\n" % ",".join("%s:%.1f" % (gpu, total[0])
                                           for gpu, total in ordered if total[2]))
    elif not args.json:
        emit("".join("total GPU %s: %.3f J in %d hold%s%s\n" % (
            gpu, total[0], total[1], "" if total[1] == 1 else "s",
            "" if total[2] == total[1] else " (%d without an energy reading)"
            % (total[1] - total[2])) for gpu, total in ordered) or "no receipts match\n")
    return 0


def receipt_matches(receipt, args):
    return ((args.job is None or str(receipt.get("job")) == args.job)
            and (args.user is None or args.user in (receipt.get("user"), str(receipt.get("uid"))))
            and (args.since is None or type(receipt.get("until_ms")) is int
                 and receipt["until_ms"] >= args.since))


# ---- Policy check: `zeusd policy check`, a policy file linted and tried without a daemon ----

def policy_check(args):
    """Lint the file (exit 1 with its line); print each table's rules, or whether a change
    would be allowed and the daemon's message (exit 0 allowed, 1 refused)."""
    try:
        policy = load_policy(args.file, flag="policy file")
    except StartupError as err:
        sys.stderr.write("zeusd policy check: %s\n" % err)
        return 1
    if args.gpu is None:
        emit(policy_rules(policy))
        return 0
    groups = tuple(args.group or ())
    who = "a member of %s" % ", ".join(groups) if groups else "a caller"
    if args.user is not None:
        try:
            account = pwd.getpwnam(args.user)
        except KeyError:
            who = "user '%s'" % args.user
        else:
            who = "uid %d (%s)" % (account.pw_uid, args.user)
            if not args.group:
                groups = UserDirectory().lookup(account.pw_uid)[1]
    operation, arguments = args.change
    grant = policy.grant(args.user, groups, False)
    message = policy_refusal(grant, who, operation, [args.gpu], arguments, [args.gpu])
    if message is not None:
        emit("refused (403): %s\n" % message)
        return 1
    emit("allowed: %s may %s on GPU %d (policy: %s)%s\n" % (
        who, args.change_text, args.gpu, grant.name,
        "; the node's power budget (%d W) is checked by the daemon" % policy.budget_w
        if policy.budget_w and operation == "set_power_limit" else ""))
    return 0


def policy_rules(policy):
    """The policy as text: the node's rules, then each table's."""
    lines = ["node: %s; GPUs in use by others' processes: %s" % (
        "a power budget of %d W" % policy.budget_w if policy.budget_w else "no power budget",
        "refused" if policy.refuse_in_use else "allowed")]
    tables = ([("default", policy.default)] if policy.default is not None else []) + \
        [("group." + name, table) for name, table in sorted(policy.groups.items())] + \
        [("user." + name, table) for name, table in sorted(policy.users.items())]
    for name, table in tables:
        rules = [Grant(name, [table]).gpus_text()]
        for key, what in POLICY_SETTINGS.items():
            value = table[key]
            unit = "W" if key == "power_limit_w" else "MHz"
            rules.append("%s: %s" % (what, "never" if value is False else "may be set"
                                     if key == "persistence_mode" else "the GPU's range"
                                     if value is True else "%d to %d %s" % (value[0], value[1],
                                                                            unit)))
        lines.append("[%s] %s" % (name, "; ".join(rules)))
    if policy.default is None:
        lines.append("callers no table names may change nothing (no [default])")
    return "\n".join(lines) + "\n"


# ---- Command line: the argument parser and its flag types ----

GROUP_HELP = (
    "  - gpu-control: GPU control operations (set power limit, clocks, persistence mode). "
    "Requires root,\n                 unless --gpu-command-overrides replaces an operation\n"
    "  - gpu-read:    GPU read operations (power reading, energy consumption)\n"
    "  - cpu-read:    CPU RAPL read operations (energy, power). Requires root"
)


class CliParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see '%s --help')\n" % (self.prog, message, self.prog))


class ChangeAction(argparse.Action):
    """`policy check`'s change flags: args.change = (operation, {argument: value})."""

    CHANGES = {"--power-limit": ("set_power_limit", ("power_limit_mw",), 1000),
               "--gpu-clocks": ("set_gpu_locked_clocks", ("min_clock_mhz", "max_clock_mhz"), 1),
               "--mem-clocks": ("set_mem_locked_clocks", ("min_clock_mhz", "max_clock_mhz"), 1),
               "--persistence": ("set_persistence_mode", (), 1)}

    def __call__(self, parser, namespace, values, option_string=None):
        operation, names, scale = self.CHANGES[option_string]
        values = values if isinstance(values, list) else [values]
        namespace.change = (operation, {name: value * scale for name, value in zip(names, values)})
        namespace.change_text = "set %s%s" % (
            POLICY_SETTINGS[OPERATION_RULES[operation][0][0]], " of %s %s" % (
                " to ".join(map(str, values)), "W" if scale == 1000 else "MHz") if values else "")


def duration_arg(text):
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def gpu_list_arg(text):
    try:
        return list(parse_ids("--gpus", text))
    except HttpError:
        raise argparse.ArgumentTypeError("invalid value '%s': expected comma-separated GPU "
                                         "indices such as 0,1" % text)


def octal_mode_arg(text):
    if not re.fullmatch(r"[0-7]{1,4}", text):
        raise argparse.ArgumentTypeError(
            "invalid value '%s': expected 1 to 4 octal digits, such as 666, 660 or 0660" % text)
    return int(text, 8)


def int_range_arg(low, high):
    """An argparse type for a decimal integer in [low, high]."""
    def parse(text):
        if not DIGITS.fullmatch(text.strip()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(
                "invalid value '%s': expected an integer from %d to %d" % (text, low, high))
        return int(text)
    return parse


def tcp_address_arg(text):
    """(host, port) from HOST:PORT, with IPv6 hosts in brackets."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z]+)\]:([0-9]{1,5})", text) or \
        re.fullmatch(r"([^:\[\]\s]+):([0-9]{1,5})", text)
    if match and int(match.group(2)) <= 65535:
        host = match.group(1)
        try:
            if text.startswith("["):
                socket.inet_pton(socket.AF_INET6, host.split("%")[0])
            return host, int(match.group(2))
        except (OSError, ValueError):
            pass
    raise argparse.ArgumentTypeError(
        "invalid address '%s': expected HOST:PORT, such as 127.0.0.1:4938, 0.0.0.0:4938 "
        "or [::1]:4938" % text)


def default_rapl_dir():
    """The host's RAPL root, or the container convention's where only that one exists."""
    if not os.path.isdir(RAPL_DIRS[0]) and os.path.isdir(RAPL_DIRS[1]):
        return RAPL_DIRS[1]
    return RAPL_DIRS[0]


def build_parser():
    parser = CliParser(
        prog="zeusd",
        description="The Zeus daemon manages and monitors compute devices on the node",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=VERSION_LINE)
    commands = parser.add_subparsers(dest="command", metavar="<COMMAND>", title="commands")
    commands.required = True

    fmt = argparse.RawTextHelpFormatter
    serve = commands.add_parser("serve", help="Start the Zeus daemon",
                                description="Start the Zeus daemon. It logs to stderr; ZEUSD_LOG "
                                            "sets the level (debug, info, warning, error; "
                                            "default info)", formatter_class=fmt)
    serve.add_argument("--mode", choices=("uds", "tcp"), default="uds",
                       help="Operating mode: UDS or TCP [default: uds]\n"
                            "  - uds: Unix domain socket\n  - tcp: TCP")
    serve.add_argument("--socket-path", default=DEFAULT_SOCKET_PATH,
                       help="[UDS mode] Path to the socket Zeusd will listen on; /run/zeusd is "
                            "created\nwhen it is the default and missing [default: %s]"
                            % DEFAULT_SOCKET_PATH)
    serve.add_argument("--socket-permissions", type=octal_mode_arg, default=0o666,
                       metavar="SOCKET_PERMISSIONS",
                       help="[UDS mode] Permissions for the socket file to be created\n"
                            "[default: 666]")
    serve.add_argument("--socket-uid", type=int_range_arg(0, 2 ** 32 - 2),
                       help="[UDS mode] UID to chown the socket file to")
    serve.add_argument("--socket-gid", type=int_range_arg(0, 2 ** 32 - 2),
                       help="[UDS mode] GID to chown the socket file to")
    serve.add_argument("--tcp-bind-address", type=tcp_address_arg, default=("127.0.0.1", 4938),
                       metavar="TCP_BIND_ADDRESS",
                       help="[TCP mode] Address to bind to\n[default: 127.0.0.1:4938]")
    serve.add_argument("--num-workers", type=int_range_arg(1, 65536),
                       help="Accepted for compatibility with the Rust daemon, and logged; it has "
                            "no effect\nhere: every connection is served on a thread of its own")
    serve.add_argument("--gpu-power-poll-hz", type=int_range_arg(1, 1000), default=20,
                       help="GPU power polling frequency in Hz for the streaming endpoint\n"
                            "[default: 20]")
    serve.add_argument("--cpu-power-poll-hz", type=int_range_arg(1, 1000), default=10,
                       help="CPU RAPL power polling frequency in Hz for the streaming endpoint\n"
                            "[default: 10]")
    serve.add_argument("--enable", action="append", nargs="+", metavar="ENABLE",
                       help="API groups to enable. Each group exposes a set of HTTP endpoints. "
                            "Groups that\nrequire root will cause the daemon to exit at startup "
                            "if it is not running as root. Comma-separated and/or repeated\n"
                            "[default: gpu-control,gpu-read,cpu-read]\n" + GROUP_HELP)
    serve.add_argument("--signing-key-path",
                       help="Path to the HMAC-SHA256 signing key file for JWT authentication. "
                            "If not provided,\nauthentication is disabled")
    serve.add_argument("--max-connections", type=int_range_arg(1, 1000000), default=1024,
                       help="Most connections served at once; one more is answered 503\n"
                            "[default: 1024]")
    serve.add_argument("--max-connections-per-client", type=int_range_arg(1, 1000000),
                       metavar="N",
                       help="Most connections one client (a uid over UDS, an IP address over "
                            "TCP; uid 0 is\nexempt) may have open at once, streams included "
                            "[default: a quarter of\n--max-connections]")
    serve.add_argument("--stream-format", choices=STREAM_FORMATS, default="per-device",
                       help="Shape of the SSE events of the stream endpoints [default: "
                            "per-device]\n"
                            "  - all-devices: one event per sample with every selected device "
                            "(zeusd 0.4,\n    Zeus 0.15)\n"
                            "  - per-device:  one event per device and sample (zeusd 0.5+, "
                            "Zeus 0.16+)")
    serve.add_argument("--gpu-command-overrides", metavar="PATH",
                       help="TOML file of commands to run in place of GPU control operations "
                            "(the Rust\ndaemon's format); with at least one, gpu-control needs "
                            "no root")
    serve.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="PATH",
                       help="Where the GPUs' saved settings are kept while a client holds them, "
                            "shared by\nthe node's daemons [default: %s]" % DEFAULT_STATE_DIR)
    serve.add_argument("--no-restore", action="store_true",
                       help="Leave GPU settings as clients set them, as the Rust daemon does: "
                            "no holds,\nno 409, no state file")
    serve.add_argument("--policy", metavar="PATH",
                       help="TOML file of who may change which GPU, to which values, and the "
                            "node's GPU power\nbudget; re-read on SIGHUP (check it first: zeusd "
                            "policy check PATH)")
    serve.add_argument("--rapl-dir", default=None,
                       help="RAPL sysfs root [default: %s, or %s if only that exists]"
                            % RAPL_DIRS)

    token = commands.add_parser("token", help="Token management",
                                description="Token management")
    token_commands = token.add_subparsers(dest="token_command", metavar="<COMMAND>",
                                          title="commands")
    token_commands.required = True
    issue = token_commands.add_parser("issue", help="Issue a new JWT token for a user",
                                      description="Issue a new JWT token for a user",
                                      formatter_class=fmt)
    issue.add_argument("--signing-key-path", required=True,
                       help="Path to the HMAC-SHA256 signing key file")
    issue.add_argument("--user", required=True,
                       help="User identity to embed in the token (the `sub` claim)")
    issue.add_argument("--scope", action="append", default=[],
                       help="API group scopes to grant, comma-separated and/or repeated; 'all' "
                            "grants every group\n" + GROUP_HELP)
    issue.add_argument("--gpus", type=gpu_list_arg, metavar="IDS",
                       help="GPU indices the token may use, comma-separated (e.g. 0,1); absent: "
                            "every GPU.\nOnly this daemon enforces it; the Rust daemon ignores "
                            "the claim")
    issue.add_argument("--expires", required=True, type=duration_arg,
                       help='Token lifetime. Human-readable duration (e.g., "1h", "7d", "30d"). '
                            'Use "never"\nfor tokens that do not expire')
    issue.add_argument("--admin", action="store_true",
                       help="An admin token: like root over the Unix socket, never refused by "
                            "another's hold,\nand it may release any GPU (within its scopes and "
                            "GPUs); for a Slurm epilog\non a TCP-only node")
    status_parser = commands.add_parser(
        "status", help="Show a running daemon's devices and their power",
        description="Show a running daemon's devices: power, energy and power limits of the "
                    "GPUs, power and energy of the CPU packages and DRAM",
        formatter_class=fmt)
    add_daemon_address(status_parser, "everything one table needs")
    status_parser.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                               help="Redraw every SECONDS (default 1) from the daemon's streams, "
                                    "until Ctrl-C")
    release_parser = commands.add_parser(
        "release", help="Put back the settings of the GPUs you changed, and end your holds",
        description="Put back the saved settings of the GPUs you hold (POST /gpu/release) and "
                    "end those holds, as the end of your session would: for a long-lived shell "
                    "(ssh, tmux, srun --pty) that outlives the job that changed them",
        formatter_class=fmt)
    add_daemon_address(release_parser, "the restores")
    release_parser.add_argument("--gpus", type=gpu_list_arg, metavar="IDS",
                                help="GPU indices to release, comma-separated [default: every "
                                     "GPU you hold]")
    receipts_parser = commands.add_parser(
        "receipts", help="Print the receipts of ended holds: who held which GPU, and its energy",
        description="Print the receipts of ended GPU holds from the state directory (no daemon "
                    "needed; root or the daemon's user): one line each and a total per GPU",
        formatter_class=fmt)
    receipts_parser.add_argument("--job", metavar="ID", help="Only the holds of this Slurm job")
    receipts_parser.add_argument("--user", metavar="NAME",
                                 help="Only the holds of this user (a name or a uid)")
    receipts_parser.add_argument("--since", type=since_arg, metavar="TIME",
                                 help="Only holds that ended since TIME: a UTC date or time "
                                      "(2026-12-01,\n2026-12-01T21:04:05Z) or a time ago (2h, 7d)")
    receipts_parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="PATH",
                                 help="The daemon's --state-dir [default: %s]" % DEFAULT_STATE_DIR)
    shape = receipts_parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="The receipts as JSON lines")
    shape.add_argument("--summary", action="store_true",
                       help="One line, gpu_energy_j=GPU:J,...: the energy per GPU, for a job "
                            "record")
    policy = commands.add_parser("policy", help="Access policy files",
                                 description="Access policy files (serve --policy)")
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="<COMMAND>",
                                            title="commands")
    policy_commands.required = True
    check = policy_commands.add_parser(
        "check", help="Lint a policy file, or try a change against it",
        description="Lint a policy file and print its tables' rules, or, with --gpu and a "
                    "change, say whether the daemon would allow it (exit 0) or refuse it (exit "
                    "1, with its message). No daemon needed", formatter_class=fmt)
    check.add_argument("file", metavar="FILE", help="The policy file")
    check.add_argument("--user", metavar="NAME", help="The caller's user name (its [user.NAME] "
                                                      "table, and its groups)")
    check.add_argument("--group", action="append", metavar="NAME",
                       help="A group of the caller, repeated for several [default: the user's "
                            "groups]")
    check.add_argument("--gpu", type=int_range_arg(0, U32_MAX), metavar="N",
                       help="The GPU the change is for")
    change = check.add_mutually_exclusive_group()
    change.add_argument("--power-limit", type=int_range_arg(0, U32_MAX // 1000), metavar="W",
                        dest="change", action=ChangeAction,
                        help="A power limit, in W")
    change.add_argument("--gpu-clocks", type=int_range_arg(0, U32_MAX), nargs=2,
                        metavar=("MIN", "MAX"), dest="change", action=ChangeAction,
                        help="Locked GPU clocks, in MHz")
    change.add_argument("--mem-clocks", type=int_range_arg(0, U32_MAX), nargs=2,
                        metavar=("MIN", "MAX"), dest="change", action=ChangeAction,
                        help="Locked memory clocks, in MHz")
    change.add_argument("--persistence", nargs=0, dest="change", action=ChangeAction,
                        help="Persistence mode")
    parser.subcommands = {"serve": serve, "token": issue, "status": status_parser,
                          "release": release_parser, "receipts": receipts_parser,
                          "policy": check}
    return parser


def add_daemon_address(parser, what):
    """The flags of a client of a running daemon: where it listens, the token, the timeout."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path",
                       help="The daemon's Unix socket [default: $ZEUSD_SOCK_PATH, else %s]"
                            % DEFAULT_SOCKET_PATH)
    where.add_argument("--tcp", type=tcp_address_arg, metavar="HOST:PORT",
                       help="The daemon's TCP address instead, e.g. node1:4938")
    parser.add_argument("--token", help="Bearer token [default: $ZEUSD_TOKEN]")
    parser.add_argument("--timeout", type=float, default=STATUS_TIMEOUT_S, metavar="SECONDS",
                        help="Longest wait for %s [default: %g]" % (what, STATUS_TIMEOUT_S))


# ---- Main: startup in the documented order, signals, serving, token issuing ----

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)
LEAVE_HOLDS = signal.SIGUSR2  # stop without restoring: the next daemon adopts the holds
STARTUP_SIGNAL_POLL_S = 1.0
DEVICES_OPENED = signal.SIGUSR1  # sent to the main thread by the thread that opened the devices


def check_privileges(groups, overrides):
    """gpu-control and cpu-read need root; gpu-control does not when an override replaces at
    least one control operation (the commands then carry the privileges, e.g. through sudo)."""
    needs_root = [g for g in groups if g in ROOT_GROUPS
                  and not (g == "gpu-control" and overrides)]
    if needs_root and os.geteuid() != 0:
        others = [g for g in groups if g not in ROOT_GROUPS]
        raise StartupError(
            "API group '%s' requires root (effective uid 0), but zeusd runs as uid %d. Run it as "
            "root, or drop %s from --enable%s." % (
                needs_root[0], os.geteuid(), " and ".join("'%s'" % g for g in needs_root),
                " (e.g. --enable %s)" % ",".join(others) if others else ""))


def on_hangup(authenticator, access=None):
    if authenticator is None and (access is None or access.policy_path is None):
        log.info("SIGHUP: authentication is off and there is no --policy; nothing to reload")
    if authenticator is not None:
        authenticator.reload()
    if access is not None:
        access.reload()


def open_devices(args, groups, authenticator, overrides, hold_store):
    """The Node, opened on a thread of its own so that SIGTERM and SIGINT end the daemon at
    once even while a device library takes its time to initialise."""
    outcome, main = [], threading.main_thread().ident

    def open_node():
        try:
            outcome.append(Node(groups, args.gpu_power_poll_hz, args.cpu_power_poll_hz,
                                args.rapl_dir or default_rapl_dir(), overrides, hold_store))
        except BaseException as err:
            outcome.append(err)
        signal.pthread_kill(main, DEVICES_OPENED)
    opener = threading.Thread(target=open_node, name="open-devices", daemon=True)
    opener.start()
    while not outcome:
        received = signal.sigtimedwait(SIGNALS + (DEVICES_OPENED,), STARTUP_SIGNAL_POLL_S)
        if received is None or received.si_signo == DEVICES_OPENED:
            continue
        if received.si_signo == signal.SIGHUP:
            on_hangup(authenticator)
            continue
        log.info("received %s while opening the devices; exiting",
                 signal.Signals(received.si_signo).name)
        flush_logs()
        os._exit(0)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def serve(args, groups):
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS + (DEVICES_OPENED,))
    overrides = {}
    if args.gpu_command_overrides is not None:
        overrides = load_overrides(args.gpu_command_overrides)
    check_privileges(groups, overrides)
    hold_store = None
    if "gpu-control" in groups and (not args.no_restore or args.policy):
        make_default_directory(args.state_dir, DEFAULT_STATE_DIR)  # holds, receipts, budget.lock
        check_state_directory(args.state_dir, os.path.dirname(os.path.abspath(args.socket_path))
                              if args.mode == "uds" else None)
    if "gpu-control" in groups and not args.no_restore:
        if args.mode == "uds":
            check_process_visibility()
        hold_store = HoldStore(args.state_dir)
    authenticator = None
    if args.signing_key_path is not None:
        authenticator = Authenticator(args.signing_key_path)
    node = open_devices(args, groups, authenticator, overrides, hold_store)
    if overrides:
        log.info("GPU command overrides from %s: %s", args.gpu_command_overrides,
                 ", ".join(overrides))
    access = Access(node, args.policy, args.state_dir)
    api = Api(node, groups, authenticator, args.stream_format, access)
    raise_file_limit(args.max_connections + FILE_LIMIT_HEADROOM)
    server = open_server(args, api)
    if args.mode == "tcp" and authenticator is None:
        log.warning("TCP mode without --signing-key-path: anyone who can reach %s may use "
                    "every enabled API group", server.describe())
    if args.num_workers is not None:
        log.info("--num-workers %d has no effect: this daemon serves each connection on its "
                 "own thread", args.num_workers)
    node.start()
    threading.Thread(target=server.accept_until_stopped, name="accept", daemon=True).start()
    log.info("zeusd %s listening on %s | API groups: %s | GPUs: %d | CPUs: %d (DRAM: %d) | "
             "auth: %s | streams: %s (%s)", __version__, server.describe(), ",".join(groups),
             len(node.gpu_ids), len(node.cpu_ids), sum(1 for p in node.cpus if p.dram),
             "on" if authenticator else "off", args.stream_format,
             STREAM_FORMAT_CLIENTS[args.stream_format])
    while True:
        received = signal.sigwait(SIGNALS)
        if received != signal.SIGHUP:
            break
        on_hangup(authenticator, access)
    log.info("received %s; shutting down%s", signal.Signals(received).name,
             ", leaving the GPUs' holds in the state file for the next daemon"
             if received == LEAVE_HOLDS and node.holds is not None else "")
    if args.mode == "uds":
        server.remove_socket()
    server.stop_accepting()
    if node.holds is not None and received != LEAVE_HOLDS:
        node.holds.restore_all("daemon-stopping")
    node.stop()
    server.wait_for_streams(1.0)
    server.server_close()
    log.info("stopped")
    return 0


def issue(args, scopes):
    key = load_signing_key(args.signing_key_path)
    if not scopes:
        sys.stderr.write("zeusd token issue: warning: the token grants no scope: it can only "
                         "call /auth/whoami (give --scope GROUPS or --scope all)\n")
    exp = None if args.expires is None else int(time.time()) + args.expires
    sys.stdout.write(issue_token(key, args.user, scopes, exp, args.gpus, args.admin) + "\n")
    return 0


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.subcommands[args.command].error("unrecognized arguments: " + " ".join(unknown))
    if args.command == "policy":
        if (args.gpu is None) != (args.change is None):
            parser.subcommands["policy"].error("--gpu and a change (--power-limit, --gpu-clocks, "
                                               "--mem-clocks or --persistence) go together")
        setup_logging()
        return policy_check(args)
    if args.command in ("status", "release", "receipts"):
        try:
            return {"status": status, "release": release, "receipts": receipts}[args.command](
                args)
        except StatusError as err:
            sys.stderr.write("zeusd %s: %s\n" % (args.command, err))
            return 1
    is_serve = args.command == "serve"
    prog, flag = ("zeusd serve", "--enable") if is_serve else ("zeusd token issue", "--scope")
    try:
        groups = parse_group_list(sum(args.enable or [[",".join(API_GROUPS)]], [])
                                  if is_serve else args.scope, allow_all=not is_serve)
        if is_serve and not groups:
            raise ValueError("no API group given (choose from %s)" % ", ".join(API_GROUPS))
    except ValueError as err:
        sys.stderr.write("%s: error: argument %s: %s (see '%s --help')\n" % (prog, flag, err, prog))
        return 2
    setup_logging()
    try:
        return serve(args, groups) if is_serve else issue(args, groups)
    except StartupError as err:
        sys.stderr.write("%s: error: %s\n" % (prog, err))
        return 1


if __name__ == "__main__":
    sys.exit(main())
