#!/usr/bin/env python3
"""zeusd: the Zeus daemon in one file.

Runs as root on a GPU node and serves an HTTP API, on a Unix socket or TCP, that lets
unprivileged programs change NVIDIA GPU settings (power limit, locked clocks, persistence
mode) and read or stream GPU power (NVML) and CPU/DRAM power (RAPL), with optional JWT
scopes. Standard library only, plus pynvml (nvidia-ml-py); Python 3.6 or newer.

    python zeusd.py serve --help
    python zeusd.py token issue --help
    python zeusd.py status --help

The file reads in the order a request meets it:
  configuration    API groups, durations, whole-value patterns
  logging          LineFormatter, log_fast (request lines), TimedLibrary (NVML at debug)
  errors           StartupError, DeviceError (what failed, not how HTTP says it), HttpError
  auth             verify_token, Authenticator: HS256 tokens, scopes, gpus, key reload
  GPUs             GpuBackend (the interface), NvmlBackend
  TOML subset      TomlReader: the override file's syntax, read as tomllib reads it
  GPU overrides    load_overrides, CommandOverride, OverriddenBackend
  CPUs             RaplCounter, RaplPackage, RaplWrapGuard
  GPU control      ControlJob (with its audit line), GpuControl: one worker per GPU
  sampling         Sample, GpuPowerMeter, CpuPowerMeter, StreamSubscriber, Sampler
  node             Node: the devices, samplers and workers the enabled groups need
  HTTP replies     Reply, and the DeviceError -> status mapping
  HTTP parameters  parse_query and its value parsers, select_ids
  HTTP API         Api.handle(request): route, group gate, auth, method, parameters, handler
  HTTP metrics     Metrics: request counts and the Prometheus scrape
  HTTP wire        RequestReader (framing and limits), HttpConnection (serve, reply, stream)
  servers          ConnectionCap with its Rejecter, TcpServer, UnixServer, bind_unix_socket
  status           `zeusd status`: DaemonClient, the table, StreamFollower
  command line     build_parser and its flag types
  main             serve (startup order, signals), issue, main
"""

import argparse
import base64
import collections
import errno
import hashlib
import hmac
import http.client
import json
import logging
import os
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
from urllib.parse import unquote_plus

__version__ = "0.5.0"
VERSION_LINE = "zeusd %s (Python; zeusd HTTP API 0.4.0 + 0.5 superset)" % __version__

log = logging.getLogger("zeusd")


# ---- Configuration: API groups, token lifetimes, whole-value patterns ----

API_GROUPS = ("gpu-control", "gpu-read", "cpu-read")
ROOT_GROUPS = ("gpu-control", "cpu-read")
STREAM_FORMATS = ("all-devices", "per-device")
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


# ---- Logging: one line per event on stderr, level from ZEUSD_LOG, client text escaped ----

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "warn": logging.WARNING, "error": logging.ERROR}
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_unprintable(text):
    """text with control characters as \\xNN escapes, so that it stays on one line."""
    if text.isprintable():
        return text
    return UNPRINTABLE.sub(escape_character, text)


def escape_character(match):
    code = ord(match.group())
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code


class LineFormatter(logging.Formatter):
    """`time LEVEL message`, the message escaped so that nothing in it can start a new line."""

    def format(self, record):
        line = "%s %s %s" % (self.formatTime(record), record.levelname,
                             escape_unprintable(record.getMessage()))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging():
    level_name = os.environ.get("ZEUSD_LOG", "info").strip().lower()
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


class LogTimestamps:
    """The handler's timestamp text, with the part up to the second made once a second."""

    def __init__(self):
        self.cached = (None, "")

    def now(self):
        now = time.time()
        second = int(now)
        cached = self.cached
        if cached[0] != second:
            cached = self.cached = (second, time.strftime("%Y-%m-%d %H:%M:%S",
                                                          time.localtime(second)))
        return "%s,%03d" % (cached[1], (now - second) * 1000)


LOG_TIMESTAMPS = LogTimestamps()


def log_fast(message):
    """Write an INFO line as the handler would, but in one os.write of its own: for the
    per-request lines, where the logging module's path costs several times more. Nothing is
    buffered, so no line is lost at exit and lines keep their order. The caller checks that
    INFO is enabled before it formats the message."""
    data = ("%s INFO %s\n" % (LOG_TIMESTAMPS.now(), escape_unprintable(message))).encode(
        "utf-8", "replace")
    while data:
        data = data[os.write(2, data):]


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


# ---- Errors: how the startup, a device operation or a request fails ----

class StartupError(Exception):
    """A reason the daemon cannot start; main prints it and exits 1."""


class DeviceError(Exception):
    """A device operation that failed. kind says how, for the API to map to a status:
    invalid-argument, not-supported, no-permission, busy, timeout or failed."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind
        self.message = message


class HttpError(Exception):
    """A request that ends in an error status: a JSON {"error": message} with extra headers,
    as (name, value) pairs."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# ---- Authentication: HS256 JSON Web Tokens, signing keys, scopes ----

TOKEN_MAX_LENGTH = 8192
LEEWAY_S = 60
BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
OPEN_PATHS = ("/discover", "/time")
BEARER_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="zeusd"'),)
Claims = collections.namedtuple("Claims", "sub scopes exp gpus")
Claims.__new__.__defaults__ = (None,)  # gpus: absent = every GPU (the Rust daemon's tokens)


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
        with open(path, "rb") as key_file:
            key = key_file.read()
            mode = os.fstat(key_file.fileno()).st_mode
    except OSError as err:
        raise StartupError("cannot read the signing key %s: %s" % (path, err.strerror or err))
    if not key:
        raise StartupError("the signing key file %s is empty; generate one with: "
                           "openssl rand -base64 32 > %s" % (path, path))
    if mode & 0o077:
        log.warning("the signing key %s is readable by group or others (mode %03o); run: "
                    "chmod 600 %s", path, mode & 0o777, path)
    return key


def issue_token(key, sub, scopes, exp, gpus=None):
    """A compact HS256 JWT with claims sub, scopes, and unless None exp and gpus."""
    claims = {"sub": sub, "scopes": list(scopes)}
    if exp is not None:
        claims["exp"] = exp
    if gpus is not None:
        claims["gpus"] = list(gpus)
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
        raise unauthorized("Invalid token: longer than %d characters." % TOKEN_MAX_LENGTH)
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
    return Claims(sub, tuple(scopes), exp, gpus)


class Authenticator:
    """Checks Authorization headers against the signing key, and token scopes against groups.

    The key and the cache of verified tokens are swapped together when SIGHUP reloads the key,
    so that no token is ever checked against one key and cached under the other.
    """

    CACHE_SIZE = 4096

    def __init__(self, path):
        self.path = path
        self.keyring = (load_signing_key(path), {})

    def reload(self):
        """Re-read the key file; on failure keep the current key and log why."""
        try:
            self.keyring = (load_signing_key(self.path), {})
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
            claims = verify_token(key, token)
            if len(verified) >= self.CACHE_SIZE:
                verified.clear()
            verified[token] = claims
        if claims.exp is not None and time.time() > claims.exp + LEEWAY_S:
            raise unauthorized("Token has expired.")
        return claims

    @staticmethod
    def authorize(claims, group):
        if group not in claims.scopes:
            raise HttpError(403, "Token for user '%s' lacks required scope '%s'. Token scopes: "
                                 "[%s]" % (claims.sub, group,
                                           ", ".join("'%s'" % s for s in claims.scopes)))


# ---- Devices, GPUs: the backend interface and its NVML implementation ----

GpuInfo = collections.namedtuple("GpuInfo", "name pci_address cumulative_energy_available uuid")
NVML_KINDS = {2: "invalid-argument", 3: "not-supported", 4: "no-permission"}
NVML_ABSENT = (9, 12)  # driver not loaded, library not found
NVML_NOT_SUPPORTED = 3
NVML_VALUE_FIELDS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


class GpuBackend:
    """The GPU operations the daemon uses, by index into `gpus`. This base has no GPUs."""

    gpus = ()

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
        self.get_field_values = nvml.nvmlDeviceGetFieldValues
        self.instant = [True] * len(self.handles)
        gpus = []
        for index, handle in enumerate(self.handles):
            name = text_of(nvml.nvmlDeviceGetName(handle))
            pci = lspci_address(nvml.nvmlDeviceGetPciInfo(handle).busId)
            try:
                uuid = text_of(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError:
                uuid = ""
            gpus.append(GpuInfo(name, pci, self._answers(nvml.nvmlDeviceGetTotalEnergyConsumption,
                                                         handle), uuid))
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

    def _call(self, function, index, *args):
        try:
            return function(self.handles[index], *args)
        except self.nvml.NVMLError as err:
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
                value = self.get_field_values(self.handles[index], self.instant_field)[0]
            except self.nvml.NVMLError as err:
                raise self._error("nvmlDeviceGetFieldValues", index, err)
            code = value.nvmlReturn
            if code == 0:
                return int(getattr(value.value, NVML_VALUE_FIELDS[value.valueType]))
            if code != NVML_NOT_SUPPORTED:
                raise DeviceError(NVML_KINDS.get(code, "failed"), "instant power read failed on "
                                  "GPU %d: %s (NVML error %d)" % (index, self.nvml.NVMLError(code),
                                                                  code))
            self.instant[index] = False
            log.info("GPU %d does not report instant power; using nvmlDeviceGetPowerUsage", index)
        return self._call(self.nvml.nvmlDeviceGetPowerUsage, index)

    def energy_mj(self, index):
        if not self.gpus[index].cumulative_energy_available:
            raise DeviceError("not-supported", "GPU %d has no cumulative energy counter (nvmlDevice"
                              "GetTotalEnergyConsumption is not supported)" % index)
        return self._call(self.nvml.nvmlDeviceGetTotalEnergyConsumption, index)

    def power_limit_mw(self, index):
        return self._call(self.nvml.nvmlDeviceGetPowerManagementLimit, index)

    def power_limit_constraints_mw(self, index):
        return tuple(self._call(self.nvml.nvmlDeviceGetPowerManagementLimitConstraints, index))

    def persistence_mode(self, index):
        return self._call(self.nvml.nvmlDeviceGetPersistenceMode, index) == 1

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


def open_gpu_backend():
    """NVML's GPUs; a backend without GPUs (and a warning) where pynvml or the driver is absent."""
    try:
        import pynvml
    except ImportError:
        log.warning("pynvml is not installed (pip install nvidia-ml-py): serving zero GPUs")
        return GpuBackend()
    try:
        return NvmlBackend(TimedLibrary(pynvml) if log.isEnabledFor(logging.DEBUG) else pynvml)
    except pynvml.NVMLError as err:
        if getattr(err, "value", None) in NVML_ABSENT:
            log.warning("NVML is not available (%s): serving zero GPUs", err)
            return GpuBackend()
        raise StartupError("cannot initialise NVML: %s" % err)
    except Exception as err:
        raise StartupError("cannot initialise NVML: %s: %s" % (type(err).__name__, err))


# ---- TOML subset: the syntax of the GPU command override file, read as tomllib reads it ----

TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
TOML_INTEGER = re.compile(r"[+-]?(?:0|[1-9](?:_?[0-9])*)(?![0-9A-Za-z_.:+-])")
TOML_BOOLEAN = re.compile(r"(true|false)(?![0-9A-Za-z_.:+-])")
TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
TOML_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


class TomlReader:
    """Reads, as tomllib does, the TOML an override file uses: [table] headers, bare keys,
    basic and literal strings, integers, booleans, arrays (over several lines too) and
    comments. Anything else is a ValueError naming the line."""

    def __init__(self, text):
        self.text = text.replace("\r\n", "\n")
        self.pos = 0

    def fail(self, message):
        raise ValueError("line %d: %s" % (self.text.count("\n", 0, self.pos) + 1, message))

    def peek(self, count=1):
        return self.text[self.pos:self.pos + count]

    def document(self):
        """{table name: {key: value}}."""
        tables, current = {}, None
        while True:
            self.skip(newlines=True)
            if self.pos >= len(self.text):
                return tables
            if self.peek() == "[":
                self.pos += 1
                self.skip()
                name = self.key()
                self.skip()
                self.expect("]")
                if name in tables:
                    self.fail("table [%s] is defined twice" % name)
                current = tables[name] = {}
            else:
                if current is None:
                    self.fail("a key outside any [table]")
                name = self.key()
                self.skip()
                self.expect("=")
                self.skip()
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
        self.pos += 1
        items = []
        while True:
            self.skip(newlines=True)
            if self.peek() == "]":
                self.pos += 1
                return items
            items.append(self.value())
            self.skip(newlines=True)
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                self.fail("expected ',' or ']' in an array")


def parse_toml(text):
    return TomlReader(text).document()


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
    (it and its process group are killed) or prints what error_pattern matches."""
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
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        out, err = process.communicate()
        reason = "did not finish within %d s and was killed" % timeout_s
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    if reason is None and process.returncode != 0:
        reason = ("exited with status %d" % process.returncode if process.returncode > 0 else
                  "was killed by signal %d" % -process.returncode)
    if reason is None and error_pattern is not None and error_pattern.search(out + "\n" + err):
        reason = "printed output matching error_pattern %r" % error_pattern.pattern
    if reason is not None:
        raise DeviceError("failed", "command '%s' %s; stdout: %s; stderr: %s" % (
            shown_command, reason, clip(out), clip(err)))


def clip(text):
    text = text.strip()
    return text if len(text) <= OUTPUT_SHOWN else text[:OUTPUT_SHOWN] + "..."


def load_overrides(path):
    """{operation: CommandOverride} from a trusted override file; StartupError otherwise."""
    try:
        with open(path, "rb") as override_file:
            info = os.fstat(override_file.fileno())
            text = override_file.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise StartupError("cannot read --gpu-command-overrides %s: %s"
                           % (path, getattr(err, "strerror", None) or err))
    if info.st_uid not in (0, os.geteuid()):
        raise StartupError("--gpu-command-overrides %s is owned by uid %d, neither root nor the "
                           "daemon's user: refusing to run the commands it names"
                           % (path, info.st_uid))
    if info.st_mode & 0o002:
        raise StartupError("--gpu-command-overrides %s is writable by everyone (mode %03o): "
                           "refusing to run the commands it names; run: chmod o-w %s"
                           % (path, info.st_mode & 0o777, path))
    if info.st_mode & 0o020:
        log.warning("--gpu-command-overrides %s is writable by its group (mode %03o); the "
                    "daemon runs what it says", path, info.st_mode & 0o777)
    try:
        tables = parse_toml(text)
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
    """Reads each RAPL counter that nobody read for 30 s, so that no wraparound goes unseen."""

    def __init__(self, packages):
        self.packages = packages
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="rapl-guard", daemon=True)

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


# ---- GPU control: one worker thread per GPU, commands run one at a time in arrival order ----

CONTROL_QUEUE_LIMIT = 256


CLIENT_ERROR_KINDS = ("invalid-argument", "not-supported")


class ControlJob:
    """One control command for one GPU; `done` is set once it ran, with `error` if it failed.
    Each one that reaches the GPU leaves an audit line: who, what, with which arguments, and
    the outcome (ERROR level only for the device's failures, not the client's mistakes)."""

    __slots__ = ("gpu", "operation", "args", "named", "who", "done", "error")

    def __init__(self, gpu, operation, args, named, who):
        self.gpu = gpu
        self.operation = operation
        self.args = args
        self.named = named
        self.who = who
        self.done = threading.Event()
        self.error = None

    def run(self, backend, counts, counts_lock):
        try:
            getattr(backend, self.operation)(self.gpu, *self.args)
        except DeviceError as err:
            self.error = err
        except Exception as err:
            self.error = DeviceError("failed", "%s failed on GPU %d: %s"
                                     % (self.operation, self.gpu, err))
        result = "ok" if self.error is None else "error"
        with counts_lock:
            counts[self.operation, result] += 1
        level = logging.ERROR if result == "error" and \
            self.error.kind not in CLIENT_ERROR_KINDS else logging.INFO
        log.log(level, "audit: %s %s gpu=%d%s: %s", self.who, self.operation, self.gpu,
                self.named, "ok" if self.error is None else "error: " + self.error.message)
        self.done.set()


class GpuControl:
    """Per-GPU command queues and their worker threads."""

    def __init__(self, backend):
        self.backend = backend
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # (operation, "ok" or "error") -> operations run
        self.queues = [queue.Queue() for _ in backend.gpus]
        for index, jobs in enumerate(self.queues):
            threading.Thread(target=self.work, args=(jobs,), name="gpu%d-control" % index,
                             daemon=True).start()

    def submit(self, ids, operation, args, named, who):
        """Queue the command on every GPU in ids, or on none if one of their queues is full;
        named ('power_limit_mw=200000') and who (the caller) are for the audit line."""
        with self.lock:
            for index in ids:
                if self.queues[index].qsize() >= CONTROL_QUEUE_LIMIT:
                    raise DeviceError("busy", "GPU %d has %d control commands queued; try again "
                                              "later." % (index, CONTROL_QUEUE_LIMIT))
            jobs = [ControlJob(index, operation, args, named, who) for index in ids]
            for job in jobs:
                self.queues[job.gpu].put(job)
        return jobs

    def work(self, jobs):
        while True:
            jobs.get().run(self.backend, self.counts, self.lock)


# ---- Sampling: demand-driven samplers, one read per device per tick, isolated from hangs ----

KEEPALIVE_COMMENT_S = 15.0
MAX_STREAM_BACKLOG = 65536
SSE_KEEPALIVE = b": keep-alive\n\n"
RELAYS = 2  # sampler threads taking the ticks in turn
ONE_SHOT_GRACE_S = 0.5


class Sample:
    """One tick: the values of the devices that answered and the errors of those that did not,
    each rendering made once however many readers ask for it."""

    __slots__ = ("timestamp_ms", "taken", "values", "errors", "meter", "renders", "events")

    def __init__(self, taken, timestamp_ms, values, errors, meter):
        self.taken = taken
        self.timestamp_ms = timestamp_ms
        self.values = values
        self.errors = errors
        self.meter = meter
        self.renders = {}
        self.events = {}

    def render(self, ids):
        """(selected values, get_power body, all-devices SSE event) for the ids; devices
        without a value are left out (and the event is empty when none has one)."""
        rendered = self.renders.get(ids)
        if rendered is None:
            values, render_value = self.values, self.meter.render_value
            body = ('{"timestamp_ms": %d, "power_mw": {%s}}' % (
                self.timestamp_ms, ", ".join('"%d": %s' % (i, render_value(values[i]))
                                             for i in ids if i in values))).encode()
            selected = tuple(values.get(i) for i in ids)
            event = b"data: " + body + b"\n\n" if selected.count(None) < len(ids) else b""
            rendered = (selected, body, event)
            self.renders[ids] = rendered
        return rendered

    def device_event(self, index):
        """The per-device SSE event of one device that has a value."""
        event = self.events.get(index)
        if event is None:
            event = b"data: %s\n\n" % self.meter.device_json(self.timestamp_ms, index,
                                                             self.values[index])
            self.events[index] = event
        return event


class FailureLog:
    """Logs a device's failures once per run of failures, and its recovery."""

    def __init__(self, kind):
        self.kind = kind
        self.failing = set()

    def failed(self, index, err):
        if index not in self.failing:
            self.failing.add(index)
            log.error("%s; left out of samples until it reads again", err.message)

    def answered(self, values):
        for index in self.failing.intersection(values):
            self.failing.discard(index)
            log.info("%s %s reads again", self.kind, index)


class GpuPowerMeter:
    """Reads one GPU's power in mW."""

    kind = "GPU"

    def __init__(self, backend):
        self.read = backend.power_mw
        self.ids = tuple(range(len(backend.gpus)))

    render_value = str

    @staticmethod
    def device_json(timestamp_ms, index, milliwatts):
        return b'{"timestamp_ms": %d, "gpu_id": %d, "power_mw": %d}' % (
            timestamp_ms, index, milliwatts)


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

    @staticmethod
    def render_value(value):
        return '{"cpu_mw": %d, "dram_mw": %s}' % (value[0],
                                                  "null" if value[1] is None else value[1])

    @staticmethod
    def device_json(timestamp_ms, index, value):
        return b'{"timestamp_ms": %d, "cpu_id": %d, "cpu_mw": %d, "dram_mw": %s}' % (
            timestamp_ms, index, value[0], b"null" if value[1] is None else b"%d" % value[1])


class StreamSubscriber:
    """An open SSE connection, written to by its sampler's relays without blocking: one event
    per sample (all-devices) or one per device and sample (per-device), sent when a selected
    value changed."""

    __slots__ = ("sock", "ids", "per_device", "last_values", "last_write", "pending", "closed")

    def __init__(self, sock, ids, per_device):
        self.sock = sock
        self.ids = ids
        self.per_device = per_device
        self.last_values = {} if per_device else None
        self.last_write = time.monotonic()
        self.pending = b""
        self.closed = False

    def events(self, sample):
        """The events that sample holds for this subscriber (b"" if none), as sent."""
        if self.per_device:
            last, values, changed = self.last_values, sample.values, []
            for index in self.ids:
                value = values.get(index)
                if value is not None and value != last.get(index):
                    last[index] = value
                    changed.append(sample.device_event(index))
            return b"".join(changed)
        values, _, event = sample.render(self.ids)
        if values == self.last_values or not event:
            return b""
        self.last_values = values
        return event

    def deliver(self, sample, now):
        """Send the sample's events, else a keep-alive comment when one is due."""
        data = self.events(sample)
        if data:
            self.write(data, now)
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


class Sampler:
    """Reads every device of one kind at a fixed rate while anyone subscribes, and broadcasts
    each sample.

    With no subscriber its relays sleep on a condition and make no device call. Two relay
    threads take the ticks of one schedule in turn (each wakes once every two periods, so a
    tick costs what it would on one thread): a tick reads each device once, publishes the
    sample through a condition (one-shot readers wait on it) and writes it to every open
    stream with non-blocking sends. A relay stuck in a device read is left behind: the next
    tick waits at most one period for that read, then counts the device as not answering
    (left out, an error for one-shot readers) until the read returns, and a new relay takes
    the stuck one's place. Healthy devices are thus never delayed by more than one period.
    """

    def __init__(self, hz, meter):
        self.kind = meter.kind
        self.period = 1.0 / hz
        self.meter = meter
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
        self.hung = {}  # device -> monotonic start of a read that has not returned in a period
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
        """The latest sample if it is less than one period old, else None."""
        sample = self.latest
        if sample is not None and time.monotonic() - sample.taken < self.period:
            return sample
        return None

    def covering(self, ids):
        """The latest sample if it is fresh and has a value or an error for each of ids."""
        sample = self.fresh()
        if sample is not None and (len(sample.values) == len(self.meter.ids) or all(
                i in sample.values or i in sample.errors for i in ids)):
            return sample
        return None

    def current(self, ids):
        """A fresh sample covering ids: the latest, or the next the relays take; None if none
        comes within two periods (and a grace)."""
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
        read, hung, in_flight = self.meter.read, self.hung, self.in_flight
        for index in self.meter.ids:
            if index in hung:
                errors[index] = self.timeout_error(index)
                continue
            in_flight[index] = time.monotonic()
            try:
                value = read(index)
            except DeviceError as err:
                errors[index] = err
            except Exception as err:
                errors[index] = DeviceError("failed", "%s %d: unexpected error reading it: %s: %s"
                                            % (self.kind, index, type(err).__name__, err))
            else:
                if value is None:
                    warming = True
                else:
                    values[index] = value
            if in_flight.pop(index, None) is None:
                self.left_behind(index)
                return "abandoned"
        self.publish(Sample(taken, timestamp_ms, values, errors, self.meter))
        return "warming" if warming else "done"

    def timeout_error(self, index):
        since = self.hung.get(index, time.monotonic())
        return DeviceError("timeout", "%s %d did not answer within %d ms (its read has been "
                           "pending for %.1f s)" % (self.kind, index, self.period * 1000,
                                                    time.monotonic() - since))

    def wait_for_tick_in_progress(self):
        """Wait (holding the lock) until no other tick is in progress, or until the read it is
        in has taken one period: that relay is then left behind, its device marked as hung,
        and a new relay takes its place."""
        while self.ticking and not self.stopped:
            timeout = self.period
            for index, since in self.in_flight.copy().items():
                timeout = since + self.period - time.monotonic()
                if timeout <= 0 and self.in_flight.pop(index, None) is not None:
                    self.hung[index] = since
                    self.ticking = False
                    self.relays -= 1
                    if self.relays < RELAYS:
                        self.spawn_relay()
                    return
            self.tick_waiters += 1
            self.tick_done.wait(max(timeout, 0.0))
            self.tick_waiters -= 1

    def left_behind(self, index):
        """This relay's read of index, declared hung, has returned: clear the mark, rejoin."""
        with self.lock:
            self.hung.pop(index, None)
            self.relays += 1

    def publish(self, sample):
        """Log failures and recoveries, write the sample to every stream, then make it the
        latest for one-shot readers and end the tick."""
        if sample.errors:
            for index, err in sample.errors.items():
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

    def __init__(self, groups, gpu_hz, cpu_hz, rapl_dir, overrides=None):
        self.gpu = GpuBackend()
        self.cpus = []
        if "gpu-read" in groups or "gpu-control" in groups:
            self.gpu = open_gpu_backend()
            if overrides:
                self.gpu = OverriddenBackend(self.gpu, overrides)
        if "cpu-read" in groups:
            self.cpus = discover_rapl(rapl_dir)
        self.gpu_ids = tuple(range(len(self.gpu.gpus)))
        self.cpu_ids = tuple(package.index for package in self.cpus)
        self.cpu_by_id = {package.index: package for package in self.cpus}
        self.control = GpuControl(self.gpu) if "gpu-control" in groups else None
        self.gpu_sampler = Sampler(gpu_hz, GpuPowerMeter(self.gpu))
        self.cpu_sampler = Sampler(cpu_hz, CpuPowerMeter(self.cpus, 1.0 / cpu_hz))
        self.guard = RaplWrapGuard(self.cpus) if self.cpus else None

    def start(self):
        self.gpu_sampler.start()
        self.cpu_sampler.start()
        if self.guard:
            self.guard.thread.start()

    def stop(self):
        self.gpu_sampler.stop()
        self.cpu_sampler.stop()
        if self.guard:
            self.guard.stopped.set()


# ---- HTTP, replies: the one reply type, and how device errors map to statuses ----

DEVICE_STATUS = {"invalid-argument": 400, "not-supported": 400, "no-permission": 403,
                 "busy": 503, "timeout": 503, "failed": 500}
SEVERITY = {500: 3, 503: 3, 403: 2, 400: 1}


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
    return json_body({"error": message})


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


# ---- HTTP, query parameters: strict parsing of booleans, integers and id lists ----

U32_MAX = 2 ** 32 - 1


def bad_request(message):
    return HttpError(400, message)


def shown(text):
    return text if len(text) <= 64 else text[:61] + "..."


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


# ---- HTTP, API: routes and their handlers, behind group gating, auth and method checks ----

Request = collections.namedtuple("Request", "method path query version headers peer")
Route = collections.namedtuple("Route", "group method params handler")
Stream = collections.namedtuple("Stream", "sampler ids per_device")
IDS = (parse_ids, False)
REQUIRED_IDS = (parse_ids, True)
BOOL = (parse_bool, True)
U32 = (parse_u32, True)
INTERNAL_ERROR = Reply(500, error_body("Internal server error; see the daemon's log."),
                       reason="internal error (traceback above)")


class Api:
    """Answers a parsed request: route, group gate, auth and scope, method, parameters,
    handler, in that order; every failure becomes an error Reply."""

    def __init__(self, node, groups, authenticator, stream_format="all-devices"):
        self.node = node
        self.groups = groups
        self.auth = authenticator
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
        self.metrics = Metrics(node, groups, list(self.routes) + list(self.disabled))
        self.discover_reply = Reply(200, json_body(self.discovery()))

    def all_routes(self):
        gpu_ids, ctl = {"gpu_ids": IDS}, {"gpu_ids": REQUIRED_IDS, "block": BOOL}
        clocks = dict(ctl, min_clock_mhz=U32, max_clock_mhz=U32)
        return {
            "/discover": Route(None, "GET", None, self.discover),
            "/time": Route(None, "GET", None, self.time),
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
            "/gpu/get_power": Route("gpu-read", "GET", gpu_ids, self.gpu_power),
            "/gpu/stream_power": Route("gpu-read", "GET", gpu_ids, self.gpu_stream),
            "/gpu/get_cumulative_energy": Route(
                "gpu-read", "GET", gpu_ids,
                self.gpu_read(lambda b, i: {"energy_mj": b.energy_mj(i)})),
            "/gpu/get_power_limit": Route(
                "gpu-read", "GET", gpu_ids,
                self.gpu_read(lambda b, i: {"power_limit_mw": b.power_limit_mw(i)})),
            "/gpu/get_power_limit_constraints": Route(
                "gpu-read", "GET", gpu_ids, self.gpu_read(self.constraints)),
            "/gpu/get_persistence_mode": Route(
                "gpu-read", "GET", gpu_ids,
                self.gpu_read(lambda b, i: {"enabled": b.persistence_mode(i)})),
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
        }

    def handle(self, request):
        """(a Reply or a Stream, the token's user or None) for a parsed request."""
        claims = None
        try:
            claims = self.authenticate(request)
            route = self.route(request, claims)
            args = parse_query(request.query, route.params) if route.params is not None else None
            result = route.handler(args, claims, request)
        except (HttpError, DeviceError) as err:
            result = error_reply(err)
        except Exception:
            log.exception("internal error answering %s %s", request.method, shown(request.path))
            result = INTERNAL_ERROR
        return result, claims.sub if claims is not None else None

    def authenticate(self, request):
        """The token's claims (None without auth or on open paths), after the group gate."""
        message = self.disabled.get(request.path)
        if message is not None:
            raise HttpError(404, message)
        if self.auth is None or request.path in OPEN_PATHS:
            return None
        return self.auth.authenticate(request.headers.get("authorization"))

    def route(self, request, claims):
        """The route for an authenticated request, after the scope and method checks."""
        route = self.routes.get(request.path)
        if claims is not None and route is not None and route.group is not None:
            self.auth.authorize(claims, route.group)
        if route is None:
            raise HttpError(404, "Not found: no endpoint at %s." % shown(request.path))
        if request.method != route.method:
            raise HttpError(405, "Method %s is not allowed on %s; use %s."
                            % (request.method, request.path, route.method),
                            (("Allow", route.method),))
        return route

    # Handlers: each takes the parsed arguments and the token's claims, and returns a Reply
    # or a Stream.

    def discover(self, args, claims, request):
        return self.discover_reply

    @staticmethod
    def time(args, claims, request):
        return Reply(200, b'{"timestamp_ms": %d}' % int(time.time() * 1000))

    @staticmethod
    def whoami(args, claims, request):
        body = {"sub": claims.sub, "scopes": list(claims.scopes)}
        if claims.exp is not None:
            body["exp"] = claims.exp
        if claims.gpus is not None:
            body["gpus"] = list(claims.gpus)
        return Reply(200, json_body(body))

    def scrape(self, args, claims, request):
        return self.metrics.render(claims, self.gpus_for(None, claims))

    def gpus_for(self, requested, claims, list_unknown=False):
        """The GPU ids a request covers: those it names (403 if the token's gpus claim leaves
        one out; 400 if one does not exist), else every GPU the token may use."""
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

    def control(self, operation, *arg_names):
        def handler(args, claims, request):
            ids = self.gpus_for(args["gpu_ids"], claims)
            values = tuple(args[n] for n in arg_names)
            named = "".join(" %s=%s" % (n, str(v).lower() if isinstance(v, bool) else v)
                            for n, v in zip(arg_names, values))
            who = request.peer + (" user=" + claims.sub if claims is not None else "")
            jobs = self.node.control.submit(ids, operation, values,
                                            named + " block=%s" % str(args["block"]).lower(), who)
            if not args["block"]:
                return EMPTY_OK
            for job in jobs:
                job.done.wait()
            return errors_reply({job.gpu: job.error for job in jobs if job.error})
        return handler

    def gpu_read(self, read):
        def handler(args, claims, request):
            results, errors = {}, {}
            for index in self.gpus_for(args.get("gpu_ids"), claims):
                try:
                    results[str(index)] = read(self.node.gpu, index)
                except DeviceError as err:
                    errors[index] = err
            return errors_reply(errors) if errors else Reply(200, json_body(results))
        return handler

    @staticmethod
    def constraints(backend, index):
        low, high = backend.power_limit_constraints_mw(index)
        return {"min_power_limit_mw": low, "max_power_limit_mw": high}

    def gpu_power(self, args, claims, request):
        ids = self.gpus_for(args.get("gpu_ids"), claims, list_unknown=True)
        return self.power(self.node.gpu_sampler, ids)

    def gpu_stream(self, args, claims, request):
        return Stream(self.node.gpu_sampler,
                      self.gpus_for(args.get("gpu_ids"), claims, list_unknown=True),
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
        return errors_reply(errors) if errors else Reply(200, sample.render(ids)[1])

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


# ---- HTTP, metrics: the Prometheus exposition of the devices and the daemon ----

METRICS_TYPE = (("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
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

    def __init__(self, node, groups, paths):
        self.node = node
        self.groups = groups
        self.paths = frozenset(paths)
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # (path or "other", status) -> requests answered
        self.failures = FailureLog("metrics:")
        self.started = process_start_time()

    def count(self, path, status):
        with self.lock:
            self.requests[path if path in self.paths else "other", status] += 1

    def render(self, claims, gpu_ids):
        page = MetricsPage()
        if "gpu-read" in self.groups and (claims is None or "gpu-read" in claims.scopes):
            self.gpu_families(page, gpu_ids)
        if "cpu-read" in self.groups and (claims is None or "cpu-read" in claims.scopes):
            self.cpu_families(page)
        self.daemon_families(page)
        return Reply(200, page.body(), METRICS_TYPE)

    def reads(self, what, ids, read):
        """[(id, value)] of the ids whose read succeeds; failures left out and logged once."""
        results, answered = [], set()
        for index in ids:
            try:
                results.append((index, read(index)))
                answered.add("%s %d" % (what, index))
            except DeviceError as err:
                self.failures.failed("%s %d" % (what, index), err)
        self.failures.answered(answered)
        return results

    def gpu_families(self, page, ids):
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
        page.family("zeusd_gpu_energy_joules_total", "counter",
                    "GPU energy since the driver loaded (NVML total energy).",
                    [((("gpu", i),), mj / 1000.0)
                     for i, mj in self.reads("energy of GPU", with_counter, backend.energy_mj)])
        page.family("zeusd_gpu_power_limit_watts", "gauge", "GPU power limit.",
                    [((("gpu", i),), mw / 1000.0)
                     for i, mw in self.reads("power limit of GPU", ids, backend.power_limit_mw)])
        constraints = self.reads("power limit constraints of GPU", ids,
                                 backend.power_limit_constraints_mw)
        for name, position, what in (("min", 0, "Lowest"), ("max", 1, "Highest")):
            page.family("zeusd_gpu_power_limit_%s_watts" % name, "gauge",
                        "%s power limit the GPU accepts." % what,
                        [((("gpu", i),), pair[position] / 1000.0) for i, pair in constraints])

    def cpu_families(self, page):
        node = self.node
        page.family("zeusd_cpu_info", "gauge", "The RAPL zones (CPU packages, psys) served.",
                    [((("cpu", p.index), ("zone", p.name)), 1) for p in node.cpus])
        energy = self.reads("energy of CPU", node.cpu_ids, lambda i: node.cpu_by_id[i].read())
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

    def daemon_families(self, page):
        node = self.node
        page.family("zeusd_build_info", "gauge", "The daemon's version and Python.",
                    [((("version", __version__), ("python", sys.version.split()[0])), 1)])
        with self.lock:
            requests = sorted(self.requests.items())
        page.family("zeusd_http_requests_total", "counter", "HTTP requests answered.",
                    [((("path", path), ("status", status)), count)
                     for (path, status), count in requests])
        page.family("zeusd_stream_subscribers", "gauge", "Open power streams.",
                    [((("kind", "gpu"),), len(node.gpu_sampler.streams)),
                     ((("kind", "cpu"),), len(node.cpu_sampler.streams))])
        operations = sorted(node.control.counts.items()) if node.control else []
        page.family("zeusd_gpu_control_operations_total", "counter",
                    "GPU control operations run, by outcome.",
                    [((("operation", operation), ("result", result)), count)
                     for (operation, result), count in operations])
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


# ---- HTTP, wire: strict request framing within limits, replies as bytes, streams ----

IDLE_TIMEOUT_S = 60.0
HEADER_TIMEOUT_S = 10.0
STREAM_SEND_TIMEOUT_S = 10.0
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 65536
MAX_HEADER_LINES = 100
MAX_BODY = 65536
MAX_CHUNK_LINE = 1024
LINGER_S = 2.0
MAX_LINGER_BYTES = 1 << 20
# method, target (no spaces or control characters), version
REQUEST_LINE = re.compile(rb"([A-Z]{1,20}) ([\x21-\x7e\x80-\xff]+) (HTTP/[0-9]\.[0-9])")
# an RFC 9110 token as the name; the value free of CR, LF, NUL and other control characters but
# the tab (parse_head trims spaces and tabs, and nothing else, around it)
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([^\x00-\x08\x0a-\x1f\x7f]*)")
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}
STATUS_LINES = {code: ("HTTP/1.1 %d %s\r\n" % (code, reason)).encode()
                for code, reason in REASONS.items()}
SERVER_HEADER = ("Server: zeusd-py/%s\r\n" % __version__).encode()
JSON_TYPE = b"Content-Type: application/json\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
CONTINUE = STATUS_LINES[100] + b"\r\n"
SSE_HEAD = (STATUS_LINES[200] + SERVER_HEADER + b"Content-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")


class ConnectionClosed(Exception):
    """The client closed the connection (or sent nothing while idle)."""


def reply_bytes(reply, connection=b"", head_only=False):
    """A Reply's status line, headers and body, to go out in one write."""
    body, headers = reply.body, reply.headers
    extra = b"".join(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
                     for name, value in headers) if headers else b""
    typed = body and not any(name.lower() == "content-type" for name, _ in headers)
    head = b"%s%s%sContent-Length: %d\r\n%s%s\r\n" % (
        STATUS_LINES[reply.status], SERVER_HEADER, JSON_TYPE if typed else b"", len(body),
        extra, connection)
    return head if head_only else head + body


TOO_MANY_CONNECTIONS = reply_bytes(Reply(503, error_body("Too many connections")), CLOSE)


def parse_head(head, peer="-"):
    """A Request from a head (request line and header lines, without the empty line)."""
    text = (head[:-1] if head.endswith(b"\r") else head).replace(b"\r\n", b"\n")
    if b"\r" in text:
        raise HttpError(400, "Malformed request: a bare CR inside a line.")
    lines = text.split(b"\n")
    request_line = REQUEST_LINE.fullmatch(lines[0])
    if not request_line:
        raise HttpError(400, "Malformed request line.")
    method, target, version = request_line.groups()
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, "Only HTTP/1.1 and HTTP/1.0 are supported.")
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise HttpError(431, "Too many header lines (limit %d)." % MAX_HEADER_LINES)
    headers = {}
    for line in lines[1:]:
        field = HEADER_LINE.fullmatch(line)
        if not field:
            raise HttpError(400, "Malformed header line (obsolete line folding, a name with "
                                 "whitespace or other characters not allowed in a name, or a "
                                 "control character in a value).")
        name, value = field.groups()
        key, value = name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")
        if key not in headers:
            headers[key] = value
        elif key == "content-length":
            if headers[key] != value:
                raise HttpError(400, "Conflicting Content-Length headers.")
        else:
            headers[key] += ", " + value
    path, query = split_target(target.decode("latin-1"))
    return Request(method.decode("ascii"), path, query, version, headers, peer)


def split_target(target):
    """(path, query) of an origin-form or absolute-form request target."""
    if not target.startswith("/") and "://" in target:
        target = "/" + target.partition("://")[2].partition("/")[2]
    path, _, query = target.partition("?")
    return path, query


def end_of_head(buffer):
    """(end of the head, start of what follows) at the first empty line, or None."""
    bare = buffer.find(b"\n\n")
    crlf = buffer.find(b"\n\r\n")
    if bare < 0 and crlf < 0:
        return None
    if crlf < 0 or 0 <= bare < crlf:
        return bare, bare + 2
    return crlf, crlf + 3


def wants_keep_alive(request):
    tokens = request.headers.get("connection", "").lower()
    if request.version == b"HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


class RequestReader:
    """Reads requests off one connection: the head at its first empty line, then the body
    (Content-Length or chunked), discarded; HttpError for anything malformed or over a limit."""

    def __init__(self, sock, peer="-"):
        self.sock = sock
        self.peer = peer
        self.buffer = b""

    def next_request(self):
        """The next Request, its body consumed; ConnectionClosed if the client goes or idles."""
        request = parse_head(self.read_head(), self.peer)
        self.drain_body(request.headers)
        return request

    def receive(self, deadline):
        """Append what the client sends next to the buffer; 408 once the deadline passes."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HttpError(408, "Request not received in time (%d s)." % HEADER_TIMEOUT_S)
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise HttpError(408, "Request not received in time (%d s)." % HEADER_TIMEOUT_S)
        if not chunk:
            raise ConnectionClosed()
        self.buffer += chunk

    def read_head(self):
        if not self.buffer.lstrip(b"\r\n"):
            self.sock.settimeout(IDLE_TIMEOUT_S)
            try:
                self.buffer = self.sock.recv(65536)
            except socket.timeout:
                raise ConnectionClosed()
            if not self.buffer:
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


def peer_of(sock, address):
    """Who is on the other end: `ip:port` over TCP, `uid=U pid=P` over a Unix socket."""
    if sock.family == socket.AF_UNIX:
        try:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            return "uid=%d pid=%d" % (uid, pid)
        except OSError:
            return "unix"
    host, port = address[:2]
    return "%s:%d" % ("[%s]" % host if ":" in host else host, port)


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


class HttpConnection(socketserver.BaseRequestHandler):
    """One client connection: reads requests in turn, has the API answer each, and writes each
    answer in one write (or streams it)."""

    def setup(self):
        self.sock = self.request
        self.peer = peer_of(self.sock, self.client_address)
        self.reader = RequestReader(self.sock, self.peer)
        self.api = self.server.api
        if self.sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        try:
            while self.serve_one():
                pass
        except (OSError, ConnectionClosed):
            pass

    def serve_one(self):
        """Read and answer one request; False when the connection is to be closed."""
        try:
            request = self.reader.next_request()
        except HttpError as err:
            self.sock.sendall(reply_bytes(error_reply(err), CLOSE))
            self.api.metrics.count(None, err.status)
            if log.isEnabledFor(logging.INFO):
                log_fast("%s - - %d: %s" % (self.peer, err.status, err.message))
            linger(self.sock)
            return False
        started = time.monotonic()
        result, user = self.api.handle(request)
        reason = None
        if isinstance(result, Stream):
            self.stream(result)
            status, keep_alive = 200, False
        else:
            reason = result.reason
            status, keep_alive = result.status, wants_keep_alive(request)
            if not keep_alive:
                connection = CLOSE
            else:
                connection = KEEP_ALIVE if request.version == b"HTTP/1.0" else b""
            self.sock.sendall(reply_bytes(result, connection, request.method == "HEAD"))
        self.api.metrics.count(request.path, status)
        if log.isEnabledFor(logging.INFO):
            log_fast("%s%s %s %s%s %d %.2fms%s" % (
                self.peer, " user=" + user if user else "", request.method, shown(request.path),
                "?" + shown(request.query) if request.query else "", status,
                (time.monotonic() - started) * 1000, ": " + reason if reason else ""))
        return keep_alive

    def stream(self, stream):
        """Server-Sent Events: the current values, then every change, until either side ends.

        The sampler's thread writes the events; this thread waits on the socket, so a client
        that goes away is noticed at once and the thread ends.
        """
        sampler, sock = stream.sampler, self.sock
        subscriber = StreamSubscriber(sock, stream.ids, stream.per_device)
        first = sampler.fresh()
        sock.settimeout(STREAM_SEND_TIMEOUT_S)
        sock.sendall(SSE_HEAD + (subscriber.events(first) if first is not None else b""))
        sock.settimeout(None)
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


# ---- Servers: TCP and Unix-socket listeners, one thread per connection, a connection cap ----

ACCEPT_POLL_S = 0.1  # how soon the accept loop notices a shutdown
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BACKOFF_S = 0.1
REJECT_LINGER_S = 1.0
MAX_REJECTED_PENDING = 1024
FILE_LIMIT_HEADROOM = 64 + MAX_REJECTED_PENDING


class Rejecter:
    """Answers connections beyond the cap without a thread each and without delaying the
    accept loop: the 503 goes out at once (non-blocking), then one thread drains what each
    client still sends (epoll, any descriptor number) for a moment, so that it reads the 503
    rather than a reset, and closes it."""

    def __init__(self):
        self.epoll = select.epoll()
        self.pending = collections.OrderedDict()  # fd -> (socket, deadline), oldest first
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.thread = threading.Thread(target=self.run, name="rejecter", daemon=True)

    def reject(self, sock):
        try:
            sock.setblocking(False)
            sock.send(TOO_MANY_CONNECTIONS)
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
                while not self.pending:
                    self.arrived.wait()
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


class ConnectionCap(socketserver.ThreadingMixIn):
    """One daemon thread per connection, at most max_connections; the next is answered 503.
    Out of descriptors, the accept loop backs off instead of spinning."""

    daemon_threads = True
    request_queue_size = 1024

    def setup_cap(self, api, max_connections):
        self.api = api
        self.max_connections = max_connections
        self.active = 0
        self.streams = 0
        self.out_of_descriptors = False
        self.rejected = 0
        self.last_rejection_log = float("-inf")
        self.count_lock = threading.Lock()
        self.streams_done = threading.Condition(self.count_lock)
        self.rejecter = Rejecter()
        self.rejecter.thread.start()

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

    def process_request(self, request, client_address):
        """Serve the connection on a thread of its own if the cap allows, else reject it."""
        with self.count_lock:
            admitted = self.active < self.max_connections
            if admitted:
                self.active += 1
        if admitted:
            try:
                threading.Thread(target=self.serve_counted, args=(request, client_address),
                                 daemon=True).start()
                return
            except RuntimeError:
                self.release()
        self.rejecter.reject(request)
        self.rejected += 1
        now = time.monotonic()
        if now - self.last_rejection_log >= 1.0:
            log.warning("refused %d connection(s): %d connections open (--max-connections)",
                        self.rejected, self.max_connections)
            self.rejected, self.last_rejection_log = 0, now

    def serve_counted(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            self.release()

    def release(self):
        with self.count_lock:
            self.active -= 1

    def handle_error(self, request, client_address):
        log.exception("error on a connection")

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


class TcpServer(ConnectionCap, socketserver.TCPServer):
    """The API on a TCP address, IPv4 or IPv6."""

    allow_reuse_address = True

    def __init__(self, family, address, api, max_connections):
        self.address_family = family
        self.setup_cap(api, max_connections)
        socketserver.TCPServer.__init__(self, address, HttpConnection)

    def describe(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


class UnixServer(ConnectionCap, socketserver.UnixStreamServer):
    """The API on a Unix socket that has its final mode and owner before it listens."""

    def __init__(self, path, permissions, uid, gid, api, max_connections):
        self.path = path
        self.permissions = permissions
        self.owner = (-1 if uid is None else uid, -1 if gid is None else gid)
        self.setup_cap(api, max_connections)
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
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StartupError("cannot create the socket %s: directory %s does not exist"
                           % (path, parent))
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


def open_server(args, api):
    if args.mode == "uds":
        claim_socket_path(args.socket_path)
        try:
            return UnixServer(args.socket_path, args.socket_permissions, args.socket_uid,
                              args.socket_gid, api, args.max_connections)
        except OSError as err:
            raise StartupError("cannot listen on %s: %s" % (args.socket_path, err))
    host, port = args.tcp_bind_address
    shown_address = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        return TcpServer(family, address, api, args.max_connections)
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


# ---- Status: `zeusd status`, a terminal view of a running daemon's devices ----

STATUS_TIMEOUT_S = 10.0
CLEAR_SCREEN = "\x1b[H\x1b[J"


class StatusError(Exception):
    """The daemon could not be reached or refused; main prints it on one line and exits 1."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket."""

    def __init__(self, path, timeout):
        http.client.HTTPConnection.__init__(self, "localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class DaemonClient:
    """GET requests to a daemon over its Unix socket or TCP, with an optional token."""

    def __init__(self, socket_path, tcp_address, token):
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        self.headers = {"Authorization": "Bearer " + token} if token else {}
        self.where = ("http://%s:%d" % tcp_address) if tcp_address else "unix:" + socket_path
        self.server = "?"

    def connect(self, timeout=STATUS_TIMEOUT_S):
        if self.tcp_address:
            return http.client.HTTPConnection(*self.tcp_address, timeout=timeout)
        return UnixHTTPConnection(self.socket_path, timeout)

    def open(self, path, timeout=STATUS_TIMEOUT_S):
        """The response to GET path (status 200), its connection still open for streams."""
        connection = self.connect(timeout)
        try:
            connection.request("GET", path, headers=self.headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as err:
            connection.close()
            raise StatusError("cannot reach the daemon at %s: %s" % (self.where, err))
        self.server = response.getheader("Server", "?")
        if response.status != 200:
            body = response.read().decode("utf-8", "replace")
            connection.close()
            try:
                message = json.loads(body)
                message = message.get("error") or message.get("errors")
            except ValueError:
                message = body[:200]
            raise StatusError("%s answered %d to GET %s: %s" % (self.where, response.status,
                                                                 path, message))
        return response

    def get(self, path):
        response = self.open(path)
        try:
            return json.loads(response.read().decode("utf-8"))
        finally:
            response.close()

    def get_or_none(self, path, notes):
        """The JSON answer, or None with the reason added to notes."""
        try:
            return self.get(path)
        except StatusError as err:
            notes.append(str(err))
            return None


def node_status(client, gpu_power=None, cpu_power=None):
    """The node's devices and their readings: (discovery, readings by kind, notes). Power comes
    from the streams when given, else from one get_power each."""
    discovery, notes = client.get("/discover"), []
    gpus = discovery.get("gpus") or [{"id": i, "name": "?"} for i in discovery["gpu_ids"]]
    cpus = discovery.get("cpus") or [{"id": i, "name": "?"} for i in discovery["cpu_ids"]]
    readings = {"gpu": {}, "cpu": {}}
    if gpus:
        power = gpu_power
        if power is None:
            power = (client.get_or_none("/gpu/get_power", notes) or {}).get("power_mw", {})
        energy = client.get_or_none("/gpu/get_cumulative_energy?gpu_ids=%s" % ",".join(
            str(g["id"]) for g in gpus if g.get("cumulative_energy_available", True)), notes) \
            if any(g.get("cumulative_energy_available", True) for g in gpus) else {}
        limits = client.get_or_none("/gpu/get_power_limit", notes) or {}
        for gpu in gpus:
            key = str(gpu["id"])
            readings["gpu"][key] = (power.get(key), ((energy or {}).get(key) or {}).get(
                "energy_mj"), limits.get(key, {}).get("power_limit_mw"))
    if cpus:
        power = cpu_power
        if power is None:
            power = (client.get_or_none("/cpu/get_power", notes) or {}).get("power_mw", {})
        energy = client.get_or_none("/cpu/get_cumulative_energy?cpu=true&dram=true", notes) or {}
        for cpu in cpus:
            key = str(cpu["id"])
            readings["cpu"][key] = (power.get(key) or {}, energy.get(key) or {})
    return gpus, cpus, readings, notes


def scaled(value, divisor, width):
    return ("%*.1f" % (width, value / divisor)) if isinstance(value, (int, float)) \
        else "%*s" % (width, "-")


def status_table(client, gpus, cpus, readings, notes):
    lines = ["%s at %s  %s" % (client.server, client.where, time.strftime("%Y-%m-%d %H:%M:%S"))]
    if gpus:
        lines.append("%-4s %-28s %9s %13s %9s" % ("GPU", "NAME", "POWER W", "ENERGY J",
                                                   "LIMIT W"))
        for gpu in gpus:
            power, energy, limit = readings["gpu"][str(gpu["id"])]
            lines.append("%-4s %-28s %s %s %s" % (gpu["id"], gpu.get("name", "?")[:28],
                                                  scaled(power, 1000.0, 9),
                                                  scaled(energy, 1000.0, 13),
                                                  scaled(limit, 1000.0, 9)))
    if cpus:
        lines.append("%-4s %-12s %9s %9s %13s %13s" % ("CPU", "ZONE", "POWER W", "DRAM W",
                                                         "ENERGY J", "DRAM J"))
        for cpu in cpus:
            power, energy = readings["cpu"][str(cpu["id"])]
            lines.append("%-4s %-12s %s %s %s %s" % (
                cpu["id"], cpu.get("name", "?")[:12], scaled(power.get("cpu_mw"), 1000.0, 9),
                scaled(power.get("dram_mw"), 1000.0, 9),
                scaled(energy.get("cpu_energy_uj"), 1e6, 13),
                scaled(energy.get("dram_energy_uj"), 1e6, 13)))
    if not gpus and not cpus:
        lines.append("no GPUs or CPUs served")
    lines.extend("note: " + note for note in notes)
    return "\n".join(lines) + "\n"


class StreamFollower:
    """Keeps the latest power of every device from a daemon's stream, either event shape."""

    def __init__(self, client, path, id_key, value_of):
        self.latest = {}
        self.id_key = id_key
        self.value_of = value_of
        self.response = client.open(path, timeout=None)
        threading.Thread(target=self.follow, name="status-stream", daemon=True).start()

    def follow(self):
        try:
            for line in self.response:
                if line.startswith(b"data: "):
                    event = json.loads(line[6:].decode("utf-8"))
                    if self.id_key in event:
                        self.latest[str(event[self.id_key])] = self.value_of(event)
                    else:
                        self.latest.update(event.get("power_mw", {}))
        except (OSError, ValueError, http.client.HTTPException):
            pass


def status(args):
    """Print the node's table once, or redraw it every --watch seconds from the streams."""
    token = args.token or os.environ.get("ZEUSD_TOKEN")
    client = DaemonClient(args.socket_path, args.tcp, token)
    if args.watch is None:
        sys.stdout.write(status_table(client, *node_status(client)))
        return 0
    gpus, cpus, _, _ = node_status(client)
    gpu_stream = cpu_stream = None
    if gpus:
        gpu_stream = StreamFollower(client, "/gpu/stream_power", "gpu_id",
                                    lambda event: event["power_mw"])
    if cpus:
        cpu_stream = StreamFollower(client, "/cpu/stream_power", "cpu_id", lambda event: {
            "cpu_mw": event["cpu_mw"], "dram_mw": event.get("dram_mw")})
    clear = CLEAR_SCREEN if sys.stdout.isatty() else "\n"
    try:
        while True:
            view = node_status(client, gpu_stream and dict(gpu_stream.latest),
                               cpu_stream and dict(cpu_stream.latest))
            sys.stdout.write(clear + status_table(client, *view))
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


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
    serve.add_argument("--socket-path", default="/var/run/zeusd.sock",
                       help="[UDS mode] Path to the socket Zeusd will listen on\n"
                            "[default: /var/run/zeusd.sock]")
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
    serve.add_argument("--stream-format", choices=STREAM_FORMATS, default="all-devices",
                       help="Shape of the SSE events of the stream endpoints [default: "
                            "all-devices]\n"
                            "  - all-devices: one event per sample with every selected device "
                            "(zeusd 0.4,\n    Zeus 0.15)\n"
                            "  - per-device:  one event per device and sample (zeusd 0.5+, "
                            "Zeus 0.16+)")
    serve.add_argument("--gpu-command-overrides", metavar="PATH",
                       help="TOML file of commands to run in place of GPU control operations "
                            "(the Rust\ndaemon's format); with at least one, gpu-control needs "
                            "no root")
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
    status_parser = commands.add_parser(
        "status", help="Show a running daemon's devices and their power",
        description="Show a running daemon's devices: power, energy and power limits of the "
                    "GPUs, power and energy of the CPU packages and DRAM",
        formatter_class=fmt)
    where = status_parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", default="/var/run/zeusd.sock",
                       help="The daemon's Unix socket [default: /var/run/zeusd.sock]")
    where.add_argument("--tcp", type=tcp_address_arg, metavar="HOST:PORT",
                       help="The daemon's TCP address instead, e.g. node1:4938")
    status_parser.add_argument("--token", help="Bearer token [default: $ZEUSD_TOKEN]")
    status_parser.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                               help="Redraw every SECONDS (default 1) from the daemon's streams, "
                                    "until Ctrl-C")
    parser.subcommands = {"serve": serve, "token": issue, "status": status_parser}
    return parser


# ---- Main: startup in the documented order, signals, serving, token issuing ----

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STARTUP_SIGNAL_POLL_S = 0.05


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


def on_hangup(authenticator):
    if authenticator is None:
        log.info("SIGHUP: authentication is off; nothing to reload")
    else:
        authenticator.reload()


def open_devices(args, groups, authenticator, overrides):
    """The Node, opened on a thread of its own so that SIGTERM and SIGINT end the daemon at
    once even while a device library takes its time to initialise."""
    outcome = []

    def open_node():
        try:
            outcome.append(Node(groups, args.gpu_power_poll_hz, args.cpu_power_poll_hz,
                                args.rapl_dir or default_rapl_dir(), overrides))
        except BaseException as err:
            outcome.append(err)
    opener = threading.Thread(target=open_node, name="open-devices", daemon=True)
    opener.start()
    while opener.is_alive():
        received = signal.sigtimedwait(SIGNALS, STARTUP_SIGNAL_POLL_S)
        if received is None:
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
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    overrides = {}
    if args.gpu_command_overrides is not None:
        overrides = load_overrides(args.gpu_command_overrides)
    check_privileges(groups, overrides)
    authenticator = None
    if args.signing_key_path is not None:
        authenticator = Authenticator(args.signing_key_path)
    node = open_devices(args, groups, authenticator, overrides)
    if overrides:
        log.info("GPU command overrides from %s: %s", args.gpu_command_overrides,
                 ", ".join(overrides))
    api = Api(node, groups, authenticator, args.stream_format)
    raise_file_limit(args.max_connections + FILE_LIMIT_HEADROOM)
    server = open_server(args, api)
    if args.mode == "tcp" and authenticator is None:
        log.warning("TCP mode without --signing-key-path: anyone who can reach %s may use "
                    "every enabled API group", server.describe())
    if args.num_workers is not None:
        log.info("--num-workers %d has no effect: this daemon serves each connection on its "
                 "own thread", args.num_workers)
    node.start()
    threading.Thread(target=server.serve_forever, args=(ACCEPT_POLL_S,), name="accept",
                     daemon=True).start()
    log.info("zeusd %s listening on %s | API groups: %s | GPUs: %d | CPUs: %d (DRAM: %d) | "
             "auth: %s", __version__, server.describe(), ",".join(groups), len(node.gpu_ids),
             len(node.cpu_ids), sum(1 for p in node.cpus if p.dram),
             "on" if authenticator else "off")
    while True:
        received = signal.sigwait(SIGNALS)
        if received != signal.SIGHUP:
            break
        on_hangup(authenticator)
    log.info("received %s; shutting down", signal.Signals(received).name)
    if args.mode == "uds":
        server.remove_socket()
    server.shutdown()
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
    sys.stdout.write(issue_token(key, args.user, scopes, exp, args.gpus) + "\n")
    return 0


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.subcommands[args.command].error("unrecognized arguments: " + " ".join(unknown))
    if args.command == "status":
        try:
            return status(args)
        except StatusError as err:
            sys.stderr.write("zeusd status: %s\n" % err)
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
