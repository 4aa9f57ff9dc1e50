#!/usr/bin/env python3
"""zeusd: the Zeus daemon in one file.

Runs as root on a GPU node and serves an HTTP API, on a Unix socket or TCP, that lets
unprivileged programs change NVIDIA GPU settings (power limit, locked clocks, persistence
mode) and read or stream GPU power (NVML) and CPU/DRAM power (RAPL), with optional JWT
scopes. Standard library only, plus pynvml (nvidia-ml-py); Python 3.6 or newer.

    python zeusd.py serve --help
    python zeusd.py token issue --help
"""

import argparse
import base64
import collections
import hashlib
import hmac
import http.server
import json
import logging
import os
import queue
import re
import resource
import select
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
from urllib.parse import unquote_plus

__version__ = "0.4.0"

log = logging.getLogger("zeusd")


# ---- Configuration and command line: groups, flag values, durations, the argument parser ----

API_GROUPS = ("gpu-control", "gpu-read", "cpu-read")
ROOT_GROUPS = ("gpu-control", "cpu-read")
GROUP_HELP = (
    "  - gpu-control: GPU control operations (set power limit, clocks, persistence mode). "
    "Requires root\n"
    "  - gpu-read:    GPU read operations (power reading, energy consumption)\n"
    "  - cpu-read:    CPU RAPL read operations (energy, power). Requires root"
)
RAPL_DIRS = ("/sys/class/powercap/intel-rapl", "/zeus_sys/class/powercap/intel-rapl")
DURATION_UNITS = {}
for _names, _seconds in ((("s", "sec", "secs", "second", "seconds"), 1),
                         (("m", "min", "mins", "minute", "minutes"), 60),
                         (("h", "hr", "hrs", "hour", "hours"), 3600),
                         (("d", "day", "days"), 86400),
                         (("w", "week", "weeks"), 604800)):
    DURATION_UNITS.update(dict.fromkeys(_names, _seconds))
DIGITS = re.compile(r"^[0-9]{1,10}$")  # enough for any 32-bit value, and int() stays cheap
DURATION_TERM = re.compile(r"\s*([0-9]{1,12})\s*([a-z]+)\s*")
DURATION_FORMS = ("'never' or '0' (no expiry), or <number><unit> terms such as 90s, 15m, 1h, "
                  "1h30m, 7d, 2w, 30days (units: s, m, h, d, w and their long names)")
LATEST_EXPIRY = 253402300799  # 9999-12-31T23:59:59Z


class CliParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see '%s --help')\n" % (self.prog, message, self.prog))


def parse_group_list(values):
    """API groups from comma-separated and/or repeated values, order kept, duplicates dropped."""
    groups = []
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if not name:
                continue
            if name not in API_GROUPS:
                raise ValueError("unknown API group '%s' (choose from %s)"
                                 % (name, ", ".join(API_GROUPS)))
            if name not in groups:
                groups.append(name)
    return groups


def parse_duration(text):
    """Seconds in a token lifetime such as '1h30m', or None for 'never' and '0'."""
    text = text.strip()
    if text.lower() == "never" or text == "0":
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


def duration_arg(text):
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def octal_mode_arg(text):
    if not re.match(r"^[0-7]{1,4}$", text):
        raise argparse.ArgumentTypeError(
            "invalid value '%s': expected 1 to 4 octal digits, such as 666, 660 or 0660" % text)
    return int(text, 8)


def int_range_arg(low, high):
    """An argparse type for a decimal integer in [low, high]."""
    def parse(text):
        if not DIGITS.match(text.strip()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(
                "invalid value '%s': expected an integer from %d to %d" % (text, low, high))
        return int(text)
    return parse


def tcp_address_arg(text):
    """(host, port) from HOST:PORT, with IPv6 hosts in brackets."""
    match = re.match(r"^\[([0-9A-Fa-f:.%a-zA-Z]+)\]:([0-9]{1,5})$", text) or \
        re.match(r"^([^:\[\]\s]+):([0-9]{1,5})$", text)
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
    parser.add_argument("-V", "--version", action="version", version="zeusd " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="<COMMAND>", title="commands")
    commands.required = True

    fmt = argparse.RawTextHelpFormatter
    serve = commands.add_parser("serve", help="Start the Zeus daemon",
                                description="Start the Zeus daemon", formatter_class=fmt)
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
                       help="Number of worker threads to use. Default is the number of logical "
                            "CPUs\n(accepted for compatibility; this daemon uses one thread per "
                            "connection)")
    serve.add_argument("--gpu-power-poll-hz", type=int_range_arg(1, 1000), default=20,
                       help="GPU power polling frequency in Hz for the streaming endpoint\n"
                            "[default: 20]")
    serve.add_argument("--cpu-power-poll-hz", type=int_range_arg(1, 1000), default=10,
                       help="CPU RAPL power polling frequency in Hz for the streaming endpoint\n"
                            "[default: 10]")
    serve.add_argument("--enable", action="append", nargs="+", metavar="ENABLE",
                       help="API groups to enable. Each group exposes a set of HTTP endpoints. "
                            "Groups that\nrequire root will cause the daemon to exit at startup "
                            "if it is not running as root\n[default: gpu-control gpu-read "
                            "cpu-read]\n" + GROUP_HELP)
    serve.add_argument("--signing-key-path",
                       help="Path to the HMAC-SHA256 signing key file for JWT authentication. "
                            "If not provided,\nauthentication is disabled")
    serve.add_argument("--max-connections", type=int_range_arg(1, 1000000), default=1024,
                       help="Most connections served at once; one more is answered 503\n"
                            "[default: 1024]")
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
                       help="API group scopes to grant. Comma-separated\n" + GROUP_HELP)
    issue.add_argument("--expires", required=True, type=duration_arg,
                       help='Token lifetime. Human-readable duration (e.g., "1h", "7d", "30d"). '
                            'Use "never"\nfor tokens that do not expire')
    return parser


# ---- Logging: one line per event on stderr, level from ZEUSD_LOG ----

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "warn": logging.WARNING, "error": logging.ERROR}


def setup_logging():
    level_name = os.environ.get("ZEUSD_LOG", "info").strip().lower()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(LOG_LEVELS.get(level_name, logging.INFO))
    log.propagate = False
    if level_name not in LOG_LEVELS:
        log.warning("ZEUSD_LOG=%r is not one of debug, info, warning, error; using info",
                    level_name)


# ---- Errors: how a request, a device operation or the startup fails ----

class StartupError(Exception):
    """A reason the daemon cannot start; main prints it and exits 1."""


class HttpError(Exception):
    """A request that ends in an error status, with its JSON message and extra headers."""

    def __init__(self, status, message, headers=b""):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.headers = headers


class DeviceError(Exception):
    """A device operation that failed; status is the HTTP status that reports it."""

    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


# ---- Authentication: HS256 JSON Web Tokens, signing keys, scopes ----

TOKEN_MAX_LENGTH = 8192
LEEWAY_S = 60
BASE64URL = re.compile(r"^[A-Za-z0-9_-]*$")
OPEN_PATHS = ("/discover", "/time")
Claims = collections.namedtuple("Claims", "sub scopes exp")


def unauthorized(message):
    return HttpError(401, message, b'WWW-Authenticate: Bearer realm="zeusd"\r\n')


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    if not BASE64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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


def issue_token(key, sub, scopes, exp):
    """A compact HS256 JWT with claims sub, scopes and (unless exp is None) exp."""
    claims = {"sub": sub, "scopes": list(scopes)}
    if exp is not None:
        claims["exp"] = exp
    signing_input = (b64url_encode(b'{"alg":"HS256","typ":"JWT"}') + "."
                     + b64url_encode(json.dumps(claims, separators=(",", ":")).encode("utf-8")))
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url_encode(signature)


def decode_segment(segment, what):
    try:
        value = json.loads(b64url_decode(segment).decode("utf-8"))
    except ValueError:
        raise unauthorized("Invalid token: the %s is not base64url-encoded JSON." % what)
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
                           % json.dumps(header.get("alg")))
    try:
        signature = b64url_decode(segments[2])
        claims = decode_segment(segments[1], "payload")
    except ValueError:
        raise unauthorized("Invalid token: the signature is not base64url.")
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
            raise unauthorized("Invalid token: unknown scope %s." % json.dumps(scope))
    if exp is not None and (type(exp) is not int or exp < 0):
        raise unauthorized("Invalid token: claim 'exp' must be an integer.")
    return Claims(sub, tuple(scopes), exp)


class Authenticator(object):
    """Checks Authorization headers against the signing key, and token scopes against groups."""

    CACHE_SIZE = 4096

    def __init__(self, key):
        self.key = key
        self.verified = {}

    def authenticate(self, header):
        """The claims of the request's bearer token; HttpError(401) if it has no valid one."""
        if header is None:
            raise unauthorized("Authentication required. "
                               "Provide an Authorization: Bearer <token> header.")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise unauthorized("Invalid token: the Authorization header must use the Bearer "
                               "scheme.")
        token = token.strip()
        claims = self.verified.get(token)
        if claims is None:
            claims = verify_token(self.key, token)
            if len(self.verified) >= self.CACHE_SIZE:
                self.verified.clear()
            self.verified[token] = claims
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

GpuInfo = collections.namedtuple("GpuInfo", "name pci_address cumulative_energy_available")
NVML_STATUS = {2: 400, 3: 400, 4: 403}  # invalid argument, not supported, no permission
NVML_ABSENT = (9, 12)  # driver not loaded, library not found
NVML_NOT_SUPPORTED = 3
NVML_VALUE_FIELDS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


class GpuBackend(object):
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
        gpus = []
        for index, handle in enumerate(self.handles):
            name = text_of(nvml.nvmlDeviceGetName(handle))
            pci = lspci_address(nvml.nvmlDeviceGetPciInfo(handle).busId)
            gpus.append(GpuInfo(name, pci, self._answers(nvml.nvmlDeviceGetTotalEnergyConsumption,
                                                         handle)))
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
            code = getattr(err, "value", None)
            raise DeviceError(NVML_STATUS.get(code, 500), "%s failed on GPU %d: %s (NVML error %s)"
                              % (function.__name__, index, err, code))

    def power_mw(self, index):
        if self.instant[index]:
            value = self._call(self.nvml.nvmlDeviceGetFieldValues, index, self.instant_field)[0]
            if value.nvmlReturn == 0:
                return int(getattr(value.value, NVML_VALUE_FIELDS[value.valueType]))
            if value.nvmlReturn != NVML_NOT_SUPPORTED:
                error = self.nvml.NVMLError(value.nvmlReturn)
                raise DeviceError(NVML_STATUS.get(value.nvmlReturn, 500),
                                  "instant power read failed on GPU %d: %s (NVML error %d)"
                                  % (index, error, value.nvmlReturn))
            self.instant[index] = False
            log.info("GPU %d does not report instant power; using nvmlDeviceGetPowerUsage", index)
        return self._call(self.nvml.nvmlDeviceGetPowerUsage, index)

    def energy_mj(self, index):
        if not self.gpus[index].cumulative_energy_available:
            raise DeviceError(400, "GPU %d has no cumulative energy counter "
                                   "(nvmlDeviceGetTotalEnergyConsumption is not supported)" % index)
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
        return NvmlBackend(pynvml)
    except pynvml.NVMLError as err:
        if getattr(err, "value", None) in NVML_ABSENT:
            log.warning("NVML is not available (%s): serving zero GPUs", err)
            return GpuBackend()
        raise StartupError("cannot initialise NVML: %s" % err)
    except Exception as err:
        raise StartupError("cannot initialise NVML: %s: %s" % (type(err).__name__, err))


# ---- Devices, CPUs: RAPL zones, counters with wraparound, the wraparound guard ----

RAPL_ZONE = re.compile(r"^intel-rapl:([0-9]+)$")
RAPL_GUARD_INTERVAL_S = 30.0


def read_text(path):
    with open(path) as text_file:
        return text_file.read().strip()


class RaplCounter(object):
    """One energy_uj file, kept open, with its wraparound count; callers hold the package lock."""

    def __init__(self, zone_dir):
        self.path = os.path.join(zone_dir, "energy_uj")
        self.max_range = int(read_text(os.path.join(zone_dir, "max_energy_range_uj")))
        self.fd = os.open(self.path, os.O_RDONLY)
        self.last_raw = self.read_raw()
        self.wraps = 0

    def read_raw(self):
        return int(os.pread(self.fd, 32, 0))

    def read(self):
        """Cumulative µJ: the raw value plus one max_energy_range_uj per wrap seen."""
        raw = self.read_raw()
        if raw < self.last_raw:
            self.wraps += 1
        self.last_raw = raw
        return raw + self.wraps * self.max_range


class RaplPackage(object):
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
                raise DeviceError(500, "CPU %d: cannot read RAPL energy: %s" % (self.index, err))


def discover_rapl(root):
    """Every intel-rapl:N zone directly under root, by N; unreadable ones skipped with a warning."""
    if not os.path.isdir(root):
        log.warning("no RAPL directory at %s: serving zero CPUs", root)
        return []
    packages = []
    for entry in os.listdir(root):
        match = RAPL_ZONE.match(entry)
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


class RaplWrapGuard(object):
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
SEVERITY = {500: 3, 503: 3, 403: 2, 400: 1}


class ControlJob(object):
    """One control command for one GPU; `done` is set once it ran, with `error` if it failed."""

    __slots__ = ("gpu", "operation", "args", "done", "error")

    def __init__(self, gpu, operation, args):
        self.gpu = gpu
        self.operation = operation
        self.args = args
        self.done = threading.Event()
        self.error = None

    def run(self, backend):
        try:
            getattr(backend, self.operation)(self.gpu, *self.args)
        except DeviceError as err:
            self.error = err
        except Exception as err:
            self.error = DeviceError(500, "%s failed on GPU %d: %s"
                                     % (self.operation, self.gpu, err))
        if self.error is not None:
            log.error("GPU %d: %s%r failed: %s", self.gpu, self.operation, self.args,
                      self.error.message)
        self.done.set()


class GpuControl(object):
    """Per-GPU command queues and their worker threads."""

    def __init__(self, backend):
        self.backend = backend
        self.lock = threading.Lock()
        self.queues = [queue.Queue() for _ in backend.gpus]
        for index, jobs in enumerate(self.queues):
            threading.Thread(target=self.work, args=(jobs,), name="gpu%d-control" % index,
                             daemon=True).start()

    def submit(self, ids, operation, args):
        """Queue the command on every GPU in ids, or on none if one of their queues is full."""
        with self.lock:
            for index in ids:
                if self.queues[index].qsize() >= CONTROL_QUEUE_LIMIT:
                    raise HttpError(503, "GPU %d has %d control commands queued; try again later."
                                    % (index, CONTROL_QUEUE_LIMIT))
            jobs = [ControlJob(index, operation, args) for index in ids]
            for job in jobs:
                self.queues[job.gpu].put(job)
        return jobs

    def work(self, jobs):
        while True:
            jobs.get().run(self.backend)


# ---- Sampling: demand-driven samplers that broadcast each reading to their subscribers ----

KEEPALIVE_COMMENT_S = 15.0
MAX_STREAM_BACKLOG = 65536
SSE_KEEPALIVE = b": keep-alive\n\n"


class Sample(object):
    """One reading of every device of a kind, rendered once per distinct selection of ids."""

    __slots__ = ("timestamp_ms", "taken", "values", "render_value", "renders")

    def __init__(self, values, render_value):
        self.taken = time.monotonic()
        self.timestamp_ms = int(time.time() * 1000)
        self.values = values
        self.render_value = render_value
        self.renders = {}

    def render(self, ids):
        """(selected values, JSON body, SSE event) for the ids."""
        rendered = self.renders.get(ids)
        if rendered is None:
            values = self.values
            body = ('{"timestamp_ms": %d, "power_mw": {%s}}' % (
                self.timestamp_ms, ", ".join('"%d": %s' % (i, self.render_value(values[i]))
                                             for i in ids if i in values))).encode()
            rendered = (tuple(values.get(i) for i in ids), body, b"data: " + body + b"\n\n")
            self.renders[ids] = rendered
        return rendered


class FailureLog(object):
    """Logs a device's read failures once per run of failures, and its recovery."""

    def __init__(self, kind):
        self.kind = kind
        self.failing = set()

    def failed(self, index, err):
        if index not in self.failing:
            self.failing.add(index)
            log.error("%s %d: read failed, keeping its last value: %s", self.kind, index,
                      err.message)

    def succeeded(self, index):
        if index in self.failing:
            self.failing.discard(index)
            log.info("%s %d: reads work again", self.kind, index)


class GpuPowerMeter(object):
    """Reads every GPU's power; a GPU whose read fails keeps its last value."""

    def __init__(self, backend):
        self.backend = backend
        self.ids = range(len(backend.gpus))
        self.last = {}
        self.failures = FailureLog("GPU")

    def __call__(self):
        values = {}
        for index in self.ids:
            try:
                values[index] = self.backend.power_mw(index)
            except DeviceError as err:
                self.failures.failed(index, err)
                if index in self.last:
                    values[index] = self.last[index]
            else:
                if self.failures.failing:
                    self.failures.succeeded(index)
        self.last = values
        return values


def render_gpu_power(milliwatts):
    return str(milliwatts)


class CpuPowerMeter(object):
    """CPU and DRAM power: RAPL energy deltas over the measured time between two reads."""

    def __init__(self, packages, period):
        self.packages = packages
        self.shortest = period / 4
        self.longest = 2 * period
        self.previous = None
        self.last = {}
        self.failures = FailureLog("CPU")

    def __call__(self):
        """{id: (cpu mW, DRAM mW or None)}, or None while there is no earlier read to compare."""
        now = time.monotonic()
        energies = {}
        for package in self.packages:
            try:
                energies[package.index] = package.read()
            except DeviceError as err:
                self.failures.failed(package.index, err)
            else:
                self.failures.succeeded(package.index)
        previous = self.previous
        if previous is not None and now - previous[0] < self.shortest:
            return None
        self.previous = (now, energies)
        if previous is None or now - previous[0] > self.longest:
            return None
        seconds = now - previous[0]
        values = dict(self.last)
        for index, (cpu, dram) in energies.items():
            before = previous[1].get(index)
            if before is not None:
                dram_mw = None
                if dram is not None and before[1] is not None:
                    dram_mw = int(round((dram - before[1]) / seconds / 1000.0))
                values[index] = (int(round((cpu - before[0]) / seconds / 1000.0)), dram_mw)
        self.last = values
        return values


def render_cpu_power(value):
    return '{"cpu_mw": %d, "dram_mw": %s}' % (value[0], "null" if value[1] is None else value[1])


class StreamSubscriber(object):
    """An open SSE connection, written to by its sampler's thread without blocking."""

    __slots__ = ("sock", "ids", "last_values", "last_write", "pending", "closed")

    def __init__(self, sock, ids, last_values):
        self.sock = sock
        self.ids = ids
        self.last_values = last_values
        self.last_write = time.monotonic()
        self.pending = b""
        self.closed = False

    def deliver(self, sample, now):
        """Send the sample if a selected value changed, else a keep-alive comment when due."""
        values, _, event = sample.render(self.ids)
        if values != self.last_values:
            self.last_values = values
            self.write(event, now)
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


class Sampler(object):
    """Reads all devices of one kind at a fixed rate while anyone subscribes; broadcasts samples.

    With no subscriber its thread sleeps on a condition and makes no device call. Each sample
    is published through one condition variable (one-shot readers wait on it), and the thread
    writes it to every open stream with non-blocking sends: one hardware read and one
    rendering per selection per tick, and no thread wake-up per subscriber.
    """

    def __init__(self, kind, hz, measure, render_value):
        self.kind = kind
        self.period = 1.0 / hz
        self.measure = measure
        self.render_value = render_value
        self.lock = threading.Lock()
        self.demand = threading.Condition(self.lock)
        self.published = threading.Condition(self.lock)
        self.read_lock = threading.Lock()
        self.subscribers = 0
        self.streams = ()
        self.latest = None
        self.stopped = False
        self.broken = False
        self.thread = threading.Thread(target=self.run, name=kind + "-sampler", daemon=True)

    def subscribe(self):
        with self.lock:
            self.subscribers += 1
            self.demand.notify()

    def unsubscribe(self):
        with self.lock:
            self.subscribers -= 1

    def add_stream(self, subscriber):
        """Deliver every later sample to subscriber; False if the sampler has stopped."""
        with self.lock:
            if self.stopped:
                return False
            self.streams += (subscriber,)
            self.subscribers += 1
            self.demand.notify()
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
            streams = self.streams
        for subscriber in streams:
            subscriber.close()

    def fresh(self):
        """The latest sample if it is less than one period old, else None."""
        sample = self.latest
        if sample is not None and time.monotonic() - sample.taken < self.period:
            return sample
        return None

    def current(self):
        """A fresh sample: the latest, one read now, or the next one the sampler takes."""
        sample = self.fresh()
        if sample is None:
            with self.read_lock:
                sample = self.fresh() or self.take()
        if sample is None:
            self.subscribe()
            try:
                sample = self.next_after(self.latest, 2 * self.period + 1.0)
            finally:
                self.unsubscribe()
        return sample

    def next_after(self, sample, timeout):
        """The first sample newer than `sample`, or None after timeout seconds or on stop."""
        with self.lock:
            if self.latest is sample and not self.stopped:
                self.published.wait(timeout)
            latest = self.latest
        return None if latest is sample or self.stopped else latest

    def take(self):
        """Measure and publish (the caller holds read_lock); None if the meter needs more reads."""
        values = self.measure()
        if values is None:
            return None
        sample = Sample(values, self.render_value)
        with self.lock:
            self.latest = sample
            self.published.notify_all()
        return sample

    def run(self):
        """Tick while anyone subscribes; a meter that needs another read gets it half a period
        later, so that even a CPU stream's first event comes within one period."""
        next_tick = 0.0
        while True:
            with self.lock:
                while not self.subscribers and not self.stopped:
                    self.demand.wait()
                if self.stopped:
                    return
            now = time.monotonic()
            if next_tick < now - self.period:
                next_tick = now
            elif next_tick > now:
                time.sleep(next_tick - now)
                if not self.subscribers:
                    continue
            try:
                with self.read_lock:
                    sample = self.take()
                self.broken = False
            except Exception:
                if not self.broken:
                    log.exception("%s sampler: reading the devices failed", self.kind)
                self.broken = True
                sample = None
            if sample is not None:
                now = time.monotonic()
                for subscriber in self.streams:
                    if not subscriber.closed:
                        subscriber.deliver(sample, now)
            next_tick += self.period if sample is not None else self.period / 2


# ---- Node: the devices, samplers and control workers that the enabled groups need ----

class Node(object):
    """Everything the API reads or drives on this machine."""

    def __init__(self, groups, gpu_hz, cpu_hz, rapl_dir):
        self.gpu = GpuBackend()
        self.cpus = []
        if "gpu-read" in groups or "gpu-control" in groups:
            self.gpu = open_gpu_backend()
        if "cpu-read" in groups:
            self.cpus = discover_rapl(rapl_dir)
        self.gpu_ids = tuple(range(len(self.gpu.gpus)))
        self.cpu_ids = tuple(package.index for package in self.cpus)
        self.cpu_by_id = dict((package.index, package) for package in self.cpus)
        self.control = GpuControl(self.gpu) if "gpu-control" in groups else None
        self.gpu_sampler = Sampler("gpu", gpu_hz, GpuPowerMeter(self.gpu), render_gpu_power)
        self.cpu_sampler = Sampler("cpu", cpu_hz, CpuPowerMeter(self.cpus, 1.0 / cpu_hz),
                                   render_cpu_power)
        self.guard = RaplWrapGuard(self.cpus) if self.cpus else None

    def start(self):
        self.gpu_sampler.thread.start()
        self.cpu_sampler.thread.start()
        if self.guard:
            self.guard.thread.start()

    def stop(self):
        self.gpu_sampler.stop()
        self.cpu_sampler.stop()
        if self.guard:
            self.guard.stopped.set()


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
    if not DIGITS.match(text) or int(text) > U32_MAX:
        raise bad_request("Invalid value for '%s': expected a non-negative integer below 2^32, "
                          "got '%s'." % (name, shown(text)))
    return int(text)


def parse_ids(name, text):
    """A tuple of distinct indices from '0,1, 2', in the order given."""
    ids = []
    for item in text.split(","):
        item = item.strip(" ")
        if not DIGITS.match(item) or int(item) > U32_MAX:
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


# ---- HTTP, API: routes and their handlers, behind group gating, auth and method checks ----

Route = collections.namedtuple("Route", "group method params handler")
Stream = collections.namedtuple("Stream", "sampler ids")
IDS = (parse_ids, False)
REQUIRED_IDS = (parse_ids, True)
BOOL = (parse_bool, True)
U32 = (parse_u32, True)


def json_body(value):
    return json.dumps(value).encode()


def errors_reply(errors):
    """200 with no body, or {"errors": …} for the failed devices under the most severe status."""
    if not errors:
        return 200, b""
    status = max((err.status for err in errors.values()), key=lambda s: SEVERITY.get(s, 0))
    return status, json_body({"errors": dict((str(i), err.message)
                                             for i, err in sorted(errors.items()))})


class Api(object):
    """Resolves a request to a route (group gate, auth, method) and runs its handler."""

    def __init__(self, node, groups, authenticator):
        self.node = node
        self.groups = groups
        self.auth = authenticator
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
        self.discover_body = json_body(self.discovery())

    def all_routes(self):
        gpu_ids, ctl = {"gpu_ids": IDS}, {"gpu_ids": REQUIRED_IDS, "block": BOOL}
        clocks = dict(ctl, min_clock_mhz=U32, max_clock_mhz=U32)
        return {
            "/discover": Route(None, "GET", None, self.discover),
            "/time": Route(None, "GET", None, self.time),
            "/auth/whoami": Route(None, "GET", None, self.whoami),
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

    def authenticate(self, path, headers):
        """The token's claims (None without auth or on open paths), after the group gate."""
        message = self.disabled.get(path)
        if message is not None:
            raise HttpError(404, message)
        if self.auth is None or path in OPEN_PATHS:
            return None
        return self.auth.authenticate(headers.get("authorization"))

    def route(self, method, path, claims):
        """The route for an authenticated request, after the scope and method checks."""
        route = self.routes.get(path)
        if claims is not None and route is not None and route.group is not None:
            self.auth.authorize(claims, route.group)
        if route is None:
            raise HttpError(404, "Not found: no endpoint at %s." % shown(path))
        if method != route.method:
            raise HttpError(405, "Method %s is not allowed on %s; use %s."
                            % (method, path, route.method),
                            b"Allow: " + route.method.encode() + b"\r\n")
        return route

    def run(self, route, query, claims):
        """The handler's (status, body), or a Stream."""
        args = parse_query(query, route.params) if route.params is not None else None
        return route.handler(args, claims)

    # Handlers: each takes the parsed arguments and the token's claims.

    def discover(self, args, claims):
        return 200, self.discover_body

    @staticmethod
    def time(args, claims):
        return 200, b'{"timestamp_ms": %d}' % int(time.time() * 1000)

    @staticmethod
    def whoami(args, claims):
        body = {"sub": claims.sub, "scopes": list(claims.scopes)}
        if claims.exp is not None:
            body["exp"] = claims.exp
        return 200, json_body(body)

    def existing_gpus(self, args):
        """The requested GPU ids (all if none given); 400 naming the first that does not exist."""
        ids = args.get("gpu_ids") or self.node.gpu_ids
        for index in ids:
            if index >= len(self.node.gpu_ids):
                raise bad_request("GPU index %d does not exist." % index)
        return ids

    def control(self, operation, *arg_names):
        def handler(args, claims):
            ids = self.existing_gpus(args)
            jobs = self.node.control.submit(ids, operation, tuple(args[n] for n in arg_names))
            if not args["block"]:
                return 200, b""
            for job in jobs:
                job.done.wait()
            return errors_reply(dict((job.gpu, job.error) for job in jobs if job.error))
        return handler

    def gpu_read(self, read):
        def handler(args, claims):
            results, errors = {}, {}
            for index in self.existing_gpus(args):
                try:
                    results[str(index)] = read(self.node.gpu, index)
                except DeviceError as err:
                    errors[index] = err
            return errors_reply(errors) if errors else (200, json_body(results))
        return handler

    @staticmethod
    def constraints(backend, index):
        low, high = backend.power_limit_constraints_mw(index)
        return {"min_power_limit_mw": low, "max_power_limit_mw": high}

    @staticmethod
    def known(ids, available, kind):
        """ids, all of which must be in available; 400 listing the unknown ones otherwise."""
        if ids is None:
            return available
        unknown = [i for i in ids if i not in available]
        if unknown:
            raise bad_request("Unknown %s indices: [%s]. Available: [%s]" % (
                kind, ", ".join(map(str, unknown)), ", ".join(map(str, available))))
        return ids

    def gpu_power(self, args, claims):
        ids = self.known(args.get("gpu_ids"), self.node.gpu_ids, "GPU")
        return 200, self.node.gpu_sampler.current().render(ids)[1]

    def gpu_stream(self, args, claims):
        return Stream(self.node.gpu_sampler, self.known(args.get("gpu_ids"), self.node.gpu_ids,
                                                        "GPU"))

    def cpu_power(self, args, claims):
        ids = self.known(args.get("cpu_ids"), self.node.cpu_ids, "CPU")
        sample = self.node.cpu_sampler.current()
        if sample is None:
            raise HttpError(503, "No CPU power sample is available; try again.")
        return 200, sample.render(ids)[1]

    def cpu_stream(self, args, claims):
        return Stream(self.node.cpu_sampler, self.known(args.get("cpu_ids"), self.node.cpu_ids,
                                                        "CPU"))

    def cpu_energy(self, args, claims):
        ids = args.get("cpu_ids") or self.node.cpu_ids
        for index in ids:
            if index not in self.node.cpu_by_id:
                raise bad_request("CPU index %d does not exist." % index)
        results, errors = {}, {}
        for index in ids:
            cpu = dram = None
            if args["cpu"] or args["dram"]:
                try:
                    cpu, dram = self.node.cpu_by_id[index].read()
                except DeviceError as err:
                    errors[index] = err
                    continue
            results[str(index)] = {"cpu_energy_uj": cpu if args["cpu"] else None,
                                   "dram_energy_uj": dram if args["dram"] else None}
        return errors_reply(errors) if errors else (200, json_body(results))


# ---- HTTP, wire: reading requests within limits, draining bodies, writing responses ----

IDLE_TIMEOUT_S = 60.0
HEADER_TIMEOUT_S = 10.0
STREAM_SEND_TIMEOUT_S = 10.0
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 65536
MAX_HEADER_LINES = 100
MAX_BODY = 65536
LINGER_S = 2.0
MAX_LINGER_BYTES = 1 << 20
REJECT_WAIT_S = 0.1
ACCEPT_POLL_S = 0.1  # how soon the accept loop notices a shutdown
METHOD = re.compile(rb"^[A-Z]{1,20}$")
TARGET = re.compile(rb"^[\x21-\x7e\x80-\xff]+$")  # no spaces or control characters
CONTENT_LENGTH = re.compile(r"^[0-9]{1,18}$")
HEX = re.compile(rb"^[0-9A-Fa-f]{1,8}$")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}
STATUS_LINES = dict((code, ("HTTP/1.1 %d %s\r\n" % (code, reason)).encode())
                    for code, reason in REASONS.items())
JSON_TYPE = b"Content-Type: application/json\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Connection: close\r\n\r\n")


class ConnectionClosed(Exception):
    """The client closed the connection (or sent nothing while idle)."""


def error_body(message):
    return json_body({"error": message})


def response_bytes(status, body, headers=b""):
    """Status line, headers and body, to go out in one write."""
    return b"%s%sContent-Length: %d\r\n%s\r\n%s" % (
        STATUS_LINES[status], JSON_TYPE if body else b"", len(body), headers, body)


TOO_MANY_CONNECTIONS = response_bytes(503, error_body("Too many connections"), CLOSE)


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


def parse_head(head):
    """(method, target, version, headers) from a request head without its blank line."""
    lines = head.split(b"\n")
    parts = lines[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not METHOD.match(parts[0]) or not TARGET.match(parts[1]):
        raise HttpError(400, "Malformed request line.")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.match(rb"^HTTP/[0-9]\.[0-9]$", version):
            raise HttpError(505, "Only HTTP/1.1 and HTTP/1.0 are supported.")
        raise HttpError(400, "Malformed request line.")
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise HttpError(431, "Too many header lines (limit %d)." % MAX_HEADER_LINES)
    headers = {}
    for raw in lines[1:]:
        name, colon, value = raw.rstrip(b"\r").partition(b":")
        if not colon or not name or name != name.strip():
            raise HttpError(400, "Malformed header line.")
        key = name.decode("latin-1").lower()
        value = value.strip().decode("latin-1")
        headers[key] = headers[key] + ", " + value if key in headers else value
    return method.decode("ascii"), target.decode("latin-1"), version, headers


def split_target(target):
    """(path, query) of an origin-form or absolute-form request target."""
    if not target.startswith("/") and "://" in target:
        target = "/" + target.partition("://")[2].partition("/")[2]
    path, _, query = target.partition("?")
    return path, query


def wants_keep_alive(version, headers):
    tokens = headers.get("connection", "").lower()
    if version == b"HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


class HttpConnection(socketserver.BaseRequestHandler):
    """One client connection: reads requests in turn and answers each in one write."""

    def setup(self):
        self.sock = self.request
        self.buffer = b""
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
            head = self.read_head()
            started = time.monotonic()
            method, target, version, headers = parse_head(head)
            self.drain_body(headers)
        except HttpError as err:
            self.sock.sendall(response_bytes(err.status, error_body(err.message),
                                             err.headers + CLOSE))
            log.info("- - %d (%s)", err.status, err.message)
            linger(self.sock)
            return False
        keep_alive = wants_keep_alive(version, headers)
        path, query = split_target(target)
        result, user = self.dispatch(method, path, query, headers)
        if isinstance(result, Stream):
            self.stream(result)
            status, keep_alive = 200, False
        else:
            status = result[0]
            self.reply(method, version, keep_alive, result)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %d %.2fms%s", method, shown(path), status,
                     (time.monotonic() - started) * 1000, " user=" + user if user else "")
        return keep_alive

    def dispatch(self, method, path, query, headers):
        """(the API's (status, body[, headers]) or Stream, the token's user or None)."""
        user = None
        try:
            claims = self.api.authenticate(path, headers)
            if claims is not None:
                user = claims.sub
            return self.api.run(self.api.route(method, path, claims), query, claims), user
        except HttpError as err:
            return (err.status, error_body(err.message), err.headers), user
        except DeviceError as err:
            return (err.status, error_body(err.message)), user
        except Exception:
            log.exception("internal error answering %s %s", method, shown(path))
            return (500, error_body("Internal server error; see the daemon's log.")), user

    def reply(self, method, version, keep_alive, result):
        """Send a (status, body[, headers]) answer in one write; no body for HEAD."""
        status, body = result[0], result[1]
        headers = result[2] if len(result) > 2 else b""
        if not keep_alive:
            headers += CLOSE
        elif version == b"HTTP/1.0":
            headers += KEEP_ALIVE
        data = response_bytes(status, body, headers)
        self.sock.sendall(data[:len(data) - len(body)] if method == "HEAD" else data)

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
        """The next request's line and headers; ConnectionClosed if the client goes or idles."""
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
            self.buffer = self.buffer.lstrip(b"\r\n")
            buffer = self.buffer
            end = buffer.find(b"\r\n\r\n")
            bare_end = buffer.find(b"\n\n")
            line_end = buffer.find(b"\n")
            if line_end > MAX_REQUEST_LINE or (line_end < 0 and len(buffer) > MAX_REQUEST_LINE):
                raise HttpError(414, "Request line longer than %d bytes." % MAX_REQUEST_LINE)
            if end < 0 or 0 <= bare_end < end:
                end, skip = bare_end, 2
            else:
                skip = 4
            header_bytes = (end if end >= 0 else len(buffer)) - max(line_end, 0)
            if header_bytes > MAX_HEADER_BYTES:
                raise HttpError(431, "Request headers larger than %d bytes." % MAX_HEADER_BYTES)
            if end >= 0:
                self.buffer = buffer[end + skip:]
                return buffer[:end]
            self.receive(deadline)

    def take(self, count, deadline):
        while len(self.buffer) < count:
            self.receive(deadline)
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def take_line(self, deadline):
        while b"\n" not in self.buffer[:1024]:
            if len(self.buffer) >= 1024:
                raise HttpError(400, "Malformed chunked body.")
            self.receive(deadline)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def drain_body(self, headers):
        """Read and discard the request body (at most 64 KiB)."""
        length, encoding = headers.get("content-length"), headers.get("transfer-encoding")
        deadline = time.monotonic() + HEADER_TIMEOUT_S
        if encoding is not None:
            if length is not None or encoding.lower() != "chunked":
                raise HttpError(400, "Unsupported body framing: only Content-Length or "
                                     "Transfer-Encoding: chunked.")
            total = 0
            while True:
                size_text = self.take_line(deadline).split(b";")[0].strip()
                if not HEX.match(size_text):
                    raise HttpError(400, "Malformed chunked body.")
                size = int(size_text, 16)
                total += size
                if total > MAX_BODY:
                    raise HttpError(413, "Request body larger than %d bytes." % MAX_BODY)
                if size == 0:
                    while self.take_line(deadline):
                        pass
                    return
                self.take(size + 2, deadline)
        if length is not None:
            if not CONTENT_LENGTH.match(length):
                raise HttpError(400, "Invalid Content-Length.")
            if int(length) > MAX_BODY:
                raise HttpError(413, "Request body larger than %d bytes." % MAX_BODY)
            if int(length) and headers.get("expect", "").lower() == "100-continue":
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.take(int(length), deadline)

    def stream(self, stream):
        """Server-Sent Events: the current values, then every change, until either side ends.

        The sampler's thread writes the events; this thread waits on the socket, so a client
        that goes away is noticed at once and the thread ends.
        """
        sampler, ids, sock = stream.sampler, stream.ids, self.sock
        first = sampler.fresh()
        sock.settimeout(STREAM_SEND_TIMEOUT_S)
        if first is None:
            sock.sendall(SSE_HEAD)
            subscriber = StreamSubscriber(sock, ids, None)
        else:
            values, _, event = first.render(ids)
            sock.sendall(SSE_HEAD + event)
            subscriber = StreamSubscriber(sock, ids, values)
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

class ConnectionCap(socketserver.ThreadingMixIn):
    """One daemon thread per connection, at most max_connections; the next is answered 503."""

    daemon_threads = True
    request_queue_size = 1024

    def setup_cap(self, api, max_connections):
        self.api = api
        self.max_connections = max_connections
        self.active = 0
        self.streams = 0
        self.count_lock = threading.Lock()
        self.streams_done = threading.Condition(self.count_lock)

    def process_request(self, request, client_address):
        with self.count_lock:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
        if full:
            self.reject(request)
            return
        threading.Thread(target=self.process_request_thread, args=(request, client_address),
                         daemon=True).start()

    def reject(self, request):
        """Answer 503 without a thread: wait briefly for the request, answer, discard, close."""
        try:
            select.select([request], [], [], REJECT_WAIT_S)
            request.setblocking(False)
            while request.recv(65536):
                pass
        except OSError:
            pass
        try:
            request.send(TOO_MANY_CONNECTIONS)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        log.warning("connection refused: %d connections open (--max-connections)",
                    self.max_connections)
        self.close_request(request)

    def shutdown_request(self, request):
        super(ConnectionCap, self).shutdown_request(request)
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


class TcpServer(ConnectionCap, http.server.HTTPServer):
    """The API on a TCP address, IPv4 or IPv6."""

    def __init__(self, family, address, api, max_connections):
        self.address_family = family
        self.setup_cap(api, max_connections)
        http.server.HTTPServer.__init__(self, address, HttpConnection)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def describe(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


class UnixServer(ConnectionCap, socketserver.UnixStreamServer):
    """The API on a Unix socket whose mode and owner are set before it listens."""

    def __init__(self, path, permissions, uid, gid, api, max_connections):
        self.path = path
        self.permissions = permissions
        self.owner = (-1 if uid is None else uid, -1 if gid is None else gid)
        self.setup_cap(api, max_connections)
        socketserver.UnixStreamServer.__init__(self, path, HttpConnection)

    def server_bind(self):
        self.socket.bind(self.path)
        os.chmod(self.path, self.permissions)
        if self.owner != (-1, -1):
            os.chown(self.path, *self.owner)
        self.inode = os.stat(self.path).st_ino

    def describe(self):
        return "unix:%s (mode %03o)" % (self.path, self.permissions)

    def remove_socket(self):
        """Unlink the socket file if it is still the one this server created."""
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass


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


# ---- Main: startup in the documented order, serving until SIGTERM/SIGINT, token issuing ----

def serve(args, groups):
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
    needs_root = [g for g in groups if g in ROOT_GROUPS]
    if needs_root and os.geteuid() != 0:
        others = [g for g in groups if g not in ROOT_GROUPS]
        raise StartupError(
            "API group '%s' requires root (effective uid 0), but zeusd runs as uid %d. Run it as "
            "root, or drop %s from --enable%s." % (
                needs_root[0], os.geteuid(), " and ".join("'%s'" % g for g in needs_root),
                " (e.g. --enable %s)" % ",".join(others) if others else ""))
    authenticator = None
    if args.signing_key_path is not None:
        authenticator = Authenticator(load_signing_key(args.signing_key_path))
    node = Node(groups, args.gpu_power_poll_hz, args.cpu_power_poll_hz,
                args.rapl_dir or default_rapl_dir())
    api = Api(node, groups, authenticator)
    raise_file_limit(args.max_connections + 64)
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
    received = signal.sigwait((signal.SIGINT, signal.SIGTERM))
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
    exp = None if args.expires is None else int(time.time()) + args.expires
    sys.stdout.write(issue_token(key, args.user, scopes, exp) + "\n")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    is_serve = args.command == "serve"
    prog, flag = ("zeusd serve", "--enable") if is_serve else ("zeusd token issue", "--scope")
    try:
        groups = parse_group_list(sum(args.enable or [["gpu-control,gpu-read,cpu-read"]], [])
                                  if is_serve else args.scope)
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
