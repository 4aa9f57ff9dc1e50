"""Tests for zeusd: the real daemon as a subprocess, with simulated devices.

The daemon runs under $ZEUSD_TEST_PYTHON (default: this interpreter) with a fake `pynvml`
module (FAKE_PYNVML below, driven by a JSON state file and writing a call log) first on its
PYTHONPATH, and a RAPL tree in a temporary directory passed with --rapl-dir. Pure parts (JWT,
durations, wraparound, query parsing, the TOML subset, NVML's ctypes field values) are also
tested in-process.

The file mirrors zeusd.py: first the helpers (fake modules, the daemon and its clients, users,
tokens: one `# -- group --` line each), then the tests under the same part banners and in
sections named as zeusd.py's (`# ---- Name: what its tests check ----`, in zeusd.py's order; a
section without tests is left out), then the real clients (Interoperability) and the checks of
zeusd.py's own layout (Architecture). No test depends on another's order: the daemons whose
bounded waits must run out start when the session starts (bounds_under_way), and their tests
wait for whatever is left of the bound. Tests over about 2 s are marked `slow`. pytest runs
them in three processes (pyproject's addopts, pytest-xdist): what is fixed for the machine (the
policy tests' users and groups, Slurm cgroups) is shared or taken in turn through flocks
(node_lock).
"""

import ast
import base64
import bisect
import collections
import contextlib
import ctypes
import fcntl
import grp
import hashlib
import hmac
import io
import json
import os
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import symtable
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from urllib.parse import quote
from urllib.request import urlopen

import pytest

import zeusd


# ==== Helpers: the fake devices, the daemon under test, clients, users, tokens ====


# -- Paths, the interpreter, limits, waiting and timing --

HERE = os.path.dirname(os.path.abspath(__file__))
ZEUSD = os.path.join(HERE, "zeusd.py")
PYTHON = os.environ.get("ZEUSD_TEST_PYTHON") or sys.executable
TIMEOUT = 10.0
IS_ROOT = os.geteuid() == 0
MAY_UNSHARE = IS_ROOT and shutil.which("unshare") is not None and subprocess.call(
    ["unshare", "--mount", "--pid", "--fork", "true"], stderr=subprocess.DEVNULL) == 0


def wait_for(predicate, what, timeout=TIMEOUT, every=0.005):
    """Poll predicate (every `every` seconds) until it returns something true; fail after
    timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(every)


def proc_status(pid, field):
    """A number from /proc/PID/status (Threads, VmHWM, VmRSS in kB)."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def timed(function, *args):
    """(result, seconds it took)."""
    started = time.monotonic()
    result = function(*args)
    return result, time.monotonic() - started


def in_background(function, *args):
    """Run function on a thread; a callable that waits for it and returns its result."""
    box = []
    thread = threading.Thread(target=lambda: box.append(timed(function, *args)), daemon=True)
    thread.start()

    def result():
        thread.join(30)
        return box[0]
    return result


def raise_own_file_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip("needs %d open files; the hard limit is %d" % (wanted, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def process_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as stat_file:
        fields = stat_file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def happens_within(predicate, seconds):
    """Whether predicate becomes true within seconds (to show that something does not)."""
    try:
        wait_for(predicate, "something", timeout=seconds)
        return True
    except AssertionError:
        return False


# -- The fake NVML (a pynvml module run by the daemon) and the node's GPUs and RAPL zones --

FAKE_PYNVML = r'''
"""A fake pynvml: GPUs from the JSON file $FAKE_NVML_STATE, one line per call in $FAKE_NVML_LOG."""
import fcntl
import json
import os
import time

NVML_FI_DEV_POWER_INSTANT = 186
NVML_SUCCESS = 0
NVML_FEATURE_DISABLED, NVML_FEATURE_ENABLED = 0, 1
_nvmlGetFunctionPointer = None  # the Zeus client checks that this is the official binding
MESSAGES = {1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported",
            4: "Insufficient Permissions", 9: "Driver Not Loaded",
            12: "NVML Shared Library Not Found", 15: "GPU is lost", 999: "Unknown Error"}


for _code, _name in enumerate(
        "UNINITIALIZED INVALID_ARGUMENT NOT_SUPPORTED NO_PERMISSION ALREADY_INITIALIZED NOT_FOUND "
        "INSUFFICIENT_SIZE INSUFFICIENT_POWER DRIVER_NOT_LOADED TIMEOUT IRQ_ISSUE "
        "LIBRARY_NOT_FOUND FUNCTION_NOT_FOUND CORRUPTED_INFOROM GPU_IS_LOST RESET_REQUIRED "
        "OPERATING_SYSTEM LIB_RM_VERSION_MISMATCH IN_USE MEMORY".split(), 1):
    globals()["NVML_ERROR_" + _name] = _code
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    def __init__(self, value):
        Exception.__init__(self, value)
        self.value = value

    def __str__(self):
        return MESSAGES.get(self.value, "Unknown Error")


class Struct(object):
    def __init__(self, **fields):
        self.__dict__.update(fields)


_cache = {}


def _state():
    path = os.environ["FAKE_NVML_STATE"]
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    if _cache.get("stamp") != stamp:
        with open(path) as state_file:
            _cache["state"] = json.load(state_file)
        _cache["stamp"] = stamp
    return _cache["state"]


def _log(line):
    fd = os.open(os.environ["FAKE_NVML_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.write(fd, ("%.6f %s\n" % (time.time(), line)).encode())
    os.close(fd)


def _call(name, gpu, *args):
    """Log the call, apply its delay and injected failure; the GPU's state."""
    state = _state()
    _log(" ".join([name, str(gpu)] + [str(a) for a in args]))
    delay = state.get("delay", {}).get(name)
    if isinstance(delay, dict):
        delay = delay.get(str(gpu))
    if delay:
        time.sleep(delay)
        _log(" ".join([name + ".done", str(gpu)]))
    if name in state.get("crash", ()):
        raise RuntimeError("simulated bug in the NVML binding")
    failures = state.get("fail", {}).get(name, {})
    code = failures.get(str(gpu), failures.get("*"))
    if code:
        raise NVMLError(code)
    return state["gpus"][gpu]


def nvmlInit():
    state = _state()
    _log("nvmlInit -")
    time.sleep(state.get("delay", {}).get("nvmlInit", 0))
    if state.get("init_fail"):
        raise NVMLError(state["init_fail"])


def nvmlShutdown():
    pass


def nvmlDeviceGetC2cModeInfoV(handle):
    raise NVMLError(3)


def nvmlDeviceGetCount():
    return len(_state()["gpus"])


def nvmlDeviceGetHandleByIndex(index):
    return index


def nvmlDeviceGetName(handle):
    return _call("nvmlDeviceGetName", handle)["name"]


def nvmlDeviceGetUUID(handle):
    return "GPU-%08x-0000-0000-0000-000000000000" % handle


def nvmlDeviceGetPciInfo(handle):
    return Struct(busId=_call("nvmlDeviceGetPciInfo", handle)["pci"].encode())


def nvmlDeviceGetTotalEnergyConsumption(handle):
    gpu = _call("nvmlDeviceGetTotalEnergyConsumption", handle)
    if not gpu.get("energy", True):
        raise NVMLError(3)
    return gpu["energy_mj"]


def nvmlDeviceGetFieldValues(handle, field_ids):
    gpu = _call("nvmlDeviceGetFieldValues", handle, *field_ids)
    code = gpu.get("instant_code", 0 if gpu.get("instant", True) else 3)
    milliwatts = gpu.get("instant_mw", 0) + (int(time.time() * 1e6) % 997 if gpu.get("jitter")
                                             else 0)
    return [Struct(nvmlReturn=code, valueType=1, value=Struct(uiVal=milliwatts))
            for _ in field_ids]


def nvmlDeviceGetPowerUsage(handle):
    return _call("nvmlDeviceGetPowerUsage", handle)["power_mw"]


def nvmlDeviceGetPowerManagementLimit(handle):
    return _call("nvmlDeviceGetPowerManagementLimit", handle)["limit_mw"]


def nvmlDeviceGetPowerManagementLimitConstraints(handle):
    gpu = _call("nvmlDeviceGetPowerManagementLimitConstraints", handle)
    return [gpu["min_limit_mw"], gpu["max_limit_mw"]]


def nvmlDeviceGetPersistenceMode(handle):
    return _call("nvmlDeviceGetPersistenceMode", handle)["persistence"]


def _setter(name, handle, *args):
    _call(name, handle, *args)


def nvmlDeviceSetPowerManagementLimit(handle, limit):
    gpu = _call("nvmlDeviceSetPowerManagementLimit", handle, limit)
    if not gpu["min_limit_mw"] <= limit <= gpu["max_limit_mw"]:
        raise NVMLError(2)
    if _state().get("keep_limits"):
        _keep_limit(handle, limit)


def _keep_limit(handle, limit):
    """With "keep_limits": true in the state, a power limit that is set stays set, for every
    process of the node: written into the state file (under an flock, replaced atomically), so
    that later reads, by this daemon or another, see it as the driver would."""
    path = os.environ["FAKE_NVML_STATE"]
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as state_file:
            state = json.load(state_file)
        state["gpus"][handle]["limit_mw"] = limit
        temp = "%s.%d.new" % (path, os.getpid())
        with open(temp, "w") as state_file:
            json.dump(state, state_file)
        os.replace(temp, path)


def nvmlDeviceSetPersistenceMode(handle, mode):
    _setter("nvmlDeviceSetPersistenceMode", handle, mode)


def nvmlDeviceSetGpuLockedClocks(handle, low, high):
    _setter("nvmlDeviceSetGpuLockedClocks", handle, low, high)
    if low > high:
        raise NVMLError(2)


def nvmlDeviceResetGpuLockedClocks(handle):
    _setter("nvmlDeviceResetGpuLockedClocks", handle)


def nvmlDeviceSetMemoryLockedClocks(handle, low, high):
    _setter("nvmlDeviceSetMemoryLockedClocks", handle, low, high)


def nvmlDeviceResetMemoryLockedClocks(handle):
    _setter("nvmlDeviceResetMemoryLockedClocks", handle)


# Process lists, as nvmlDeviceGetComputeRunningProcesses and ...GraphicsRunningProcesses give
# them: each GPU's "procs" (compute) and "graphics_procs" (graphics) pids in the state, and its
# "procs_once": pids in the first compute list of this process only (a process that ended
# between NVML's list and /proc). Each call is logged, delayed and failed through _call.
_listed_once = set()


def _processes(name, handle, key):
    gpu = _call(name, handle)
    pids = list(gpu.get(key, ()))
    if key == "procs":
        once = [pid for pid in gpu.get("procs_once", ()) if (handle, pid) not in _listed_once]
        _listed_once.update((handle, pid) for pid in once)
        pids += once
    return [Struct(pid=pid, usedGpuMemory=None, gpuInstanceId=0xFFFFFFFF,
                   computeInstanceId=0xFFFFFFFF) for pid in pids]


def nvmlDeviceGetComputeRunningProcesses(handle):
    return _processes("nvmlDeviceGetComputeRunningProcesses", handle, "procs")


def nvmlDeviceGetGraphicsRunningProcesses(handle):
    return _processes("nvmlDeviceGetGraphicsRunningProcesses", handle, "graphics_procs")
'''


GPUS = [
    {"name": "NVIDIA H100 80GB HBM3", "pci": "00000000:00:06.0", "power_mw": 75000,
     "instant_mw": 76000, "energy_mj": 123456},
    {"name": "NVIDIA A40", "pci": "00000000:41:00.0", "power_mw": 120000, "instant": False,
     "energy": False},
    {"name": "NVIDIA H100 80GB HBM3", "pci": "00000000:C1:00.0", "power_mw": 98000,
     "instant_mw": 99000, "energy_mj": 5000},
]
GPU_DEFAULTS = {"limit_mw": 300000, "min_limit_mw": 100000, "max_limit_mw": 700000,
                "persistence": 1}
MAX_RANGE_UJ = 262143328850


# (directory, name, start µJ, DRAM start µJ or None)
RAPL = [("intel-rapl:0", "package-0", 1000000, 5000), ("intel-rapl:1", "psys", 7, None)]
POWER_SETTERS = ("nvmlDeviceSetPowerManagementLimit", "nvmlDeviceSetPersistenceMode",
                 "nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks",
                 "nvmlDeviceSetMemoryLockedClocks", "nvmlDeviceResetMemoryLockedClocks")
POWER_READS = ("nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage")


# An idle daemon with every group: main, accept, rejecter, two relays for each of the two
# samplers, the RAPL guard, the holds watcher, the device calls' watchdog, a worker per GPU.
IDLE_THREADS = 10 + len(GPUS)


# An idle daemon with --enable gpu-read: main, accept, rejecter, two relays for each sampler,
# the device calls' watchdog.
READ_ONLY_IDLE_THREADS = 8


# -- The simulated node: fake NVML state and call log, RAPL tree --

class FakeNode(object):
    """A directory holding the fake pynvml module, its state and call log, and a RAPL tree."""

    def __init__(self, root, gpus=GPUS, rapl=RAPL):
        self.root = root
        self.lib = os.path.join(root, "lib")
        os.makedirs(self.lib)
        with open(os.path.join(self.lib, "pynvml.py"), "w") as module:
            module.write(FAKE_PYNVML)
        self.state_path = os.path.join(root, "nvml.json")
        self.log_path = os.path.join(root, "nvml.log")
        self.state = {"gpus": [dict(GPU_DEFAULTS, **gpu) for gpu in gpus]}
        self.save()
        self.rapl = os.path.join(root, "rapl")
        os.makedirs(self.rapl)
        for directory, name, start, dram in rapl:
            self.add_zone(directory, name, start)
            if dram is not None:
                self.add_zone(directory + "/" + directory + ":0", "dram", dram)

    def env(self):
        return {"PYTHONPATH": self.lib, "FAKE_NVML_STATE": self.state_path,
                "FAKE_NVML_LOG": self.log_path}

    def save(self):
        """Replace the state file atomically (the fake reloads it on change)."""
        temp = self.state_path + ".new"
        with open(temp, "w") as state_file:
            json.dump(self.state, state_file)
        os.replace(temp, self.state_path)

    def update(self, **changes):
        self.state.update(changes)
        self.save()

    def set_gpu(self, index, **values):
        self.state["gpus"][index].update(values)
        self.save()

    def timed_calls(self, *names):
        """[(unix time, function, gpu, args...)] from the call log, optionally only those named."""
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as log_file:
            rows = [line.split() for line in log_file if line.strip()]
        return [(float(row[0]),) + tuple(row[1:]) for row in rows if not names or row[1] in names]

    def calls(self, *names):
        """[(function, gpu, args...)] from the call log, optionally only those named."""
        return [row[1:] for row in self.timed_calls(*names)]

    def add_zone(self, directory, name, energy_uj):
        path = os.path.join(self.rapl, directory)
        os.makedirs(path)
        for file_name, value in (("name", name), ("max_energy_range_uj", MAX_RANGE_UJ)):
            with open(os.path.join(path, file_name), "w") as zone_file:
                zone_file.write("%s\n" % value)
        self.set_energy(directory, energy_uj)

    def set_energy(self, directory, energy_uj):
        """Write the counter in place with a constant length, as a reader may read any time."""
        fd = os.open(os.path.join(self.rapl, directory, "energy_uj"), os.O_WRONLY | os.O_CREAT)
        os.pwrite(fd, b"%012d\n" % energy_uj, 0)
        os.close(fd)


class RaplTicker(object):
    """Advances RAPL counters at a steady simulated power, in real time."""

    def __init__(self, node, watts):
        self.node = node
        self.watts = watts
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()

    def run(self):
        started = time.monotonic()
        while not self.stopped.wait(0.002):
            elapsed = time.monotonic() - started
            for directory, (start, watts) in self.watts.items():
                self.node.set_energy(directory, start + int(watts * elapsed * 1e6))


def gpu_sample(values, errors=None, timestamp_ms=1000):
    return zeusd.Sample(time.monotonic(), timestamp_ms, values, errors or {})


def rapl_zone(tmp_path, start_uj, range_uj=1000):
    """A zone directory with a counter at start_uj, and its RaplCounter."""
    zone = tmp_path / "zone"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("%d\n" % range_uj)
    (zone / "energy_uj").write_text("%d\n" % start_uj)
    return zone, zeusd.RaplCounter(str(zone))


def node_limits(node):
    """{gpu: power limit mW} as the state file (the fake driver) has them now."""
    with open(node.state_path) as state_file:
        return {i: gpu["limit_mw"] for i, gpu in enumerate(json.load(state_file)["gpus"])}


# -- The daemon under test, and an HTTP/1.1 client that speaks raw bytes --

Response = collections.namedtuple("Response", "status headers body")


def response_json(response):
    assert response.headers.get("content-type") == "application/json", response
    return json.loads(response.body.decode())


class Connection(object):
    """One connection to the daemon; requests go out as given, responses are parsed by hand."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.buffer = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buffer += chunk

    def read_head(self):
        while b"\r\n\r\n" not in self.buffer:
            self.fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def response(self, head_only=False):
        status, headers = self.read_head()
        if status == 100:
            return self.response(head_only)
        length = int(headers.get("content-length", 0))
        if head_only:
            length = 0
        while len(self.buffer) < length:
            self.fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(status, headers, body)

    def request(self, method, path, headers=None, body=b""):
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: localhost"]
        for name, value in (headers or {}).items():
            lines.append("%s: %s" % (name, value))
        if body:
            lines.append("Content-Length: %d" % len(body))
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return self.response(head_only=method == "HEAD")

    def closed_by_peer(self, timeout=TIMEOUT):
        """True once the daemon closes the connection (EOF or reset)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


class EventStream(object):
    """An SSE subscription: the response head, then events as they arrive."""

    def __init__(self, connection, path, headers=None):
        self.connection = connection
        request = "GET %s HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n" % path
        for name, value in (headers or {}).items():
            request += "%s: %s\r\n" % (name, value)
        connection.send((request + "\r\n").encode())
        self.status, self.headers = connection.read_head()

    def next_block(self, timeout=TIMEOUT):
        """The next event or comment block's text, or None if none came within timeout."""
        connection = self.connection
        deadline = time.monotonic() + timeout
        while b"\n\n" not in connection.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([connection.sock], [], [], remaining)[0]:
                return None
            connection.fill()
        block, connection.buffer = connection.buffer.split(b"\n\n", 1)
        return block.decode()

    def next_event(self, timeout=TIMEOUT):
        """The next data event's JSON (comments skipped), or None."""
        deadline = time.monotonic() + timeout
        while True:
            block = self.next_block(max(0.0, deadline - time.monotonic()))
            if block is None:
                return None
            if block.startswith("data: "):
                assert "\n" not in block, block
                return json.loads(block[len("data: "):])

    def close(self):
        self.connection.close()


def skip_unless_root_may_start(args):
    """Skip the test when not root and the daemon's groups (the default ones, or --enable's)
    include one that needs root: such a daemon would refuse to start."""
    if IS_ROOT:
        return
    args = list(args)
    enabled = ",".join(args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--enable")
    needs = [g for g in zeusd.ROOT_GROUPS if g in (enabled or ",".join(zeusd.API_GROUPS))
             and not (g == "gpu-control" and "--gpu-command-overrides" in args)]
    if needs:
        pytest.skip("needs root: the daemon's groups %s require uid 0" % ", ".join(needs))


class Daemon(object):
    """`zeusd.py serve` as a subprocess on a temporary socket or a free loopback port."""

    def __init__(self, node, *args, **options):
        self.node = node
        self.mode = options.get("mode", "uds")
        self.socket_path = os.path.join(node.root, options.get("socket_name", "zeusd.sock"))
        self.log_path = options.get("log_path") or os.path.join(node.root,
                                                                "daemon-%d.log" % id(self))
        skip_unless_root_may_start(args)
        script = options.get("script")  # run as a script; by default, zeusd_command()
        python = options.get("python", PYTHON)
        command = options.get("prefix", []) + ([python, script] if script else
                                                zeusd_command(python)) + [
                   "serve", "--mode", self.mode, "--rapl-dir", node.rapl]
        state_dir = options.get("state_dir", os.path.join(node.root, "state"))
        if "--state-dir" not in args and "--no-restore" not in args and state_dir is not None:
            command += ["--state-dir", state_dir]  # state_dir=None: the daemon's default
        if self.mode == "uds":
            command += ["--socket-path", self.socket_path]
        else:
            command += ["--tcp-bind-address", options.get("address", "127.0.0.1:0")]
        command += list(args)
        env = dict(os.environ, **node.env())
        if not script:
            env = with_zeusd_path(env)
        env.pop("ZEUSD_LOG", None)
        env.update(options.get("env", {}))
        self.quiet = env.get("ZEUSD_LOG") in ("warning", "error")
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=options.get("preexec_fn"))
        self.address = None
        if options.get("wait", True):
            self.wait_ready()

    def log(self):
        with open(self.log_path, "rb") as log_file:
            return log_file.read().decode("utf-8", "replace")

    def wait_ready(self):
        def ready():
            if self.process.poll() is not None:
                raise AssertionError("zeusd exited with %s:\n%s"
                                     % (self.process.returncode, self.log()))
            if self.mode == "uds":
                try:
                    self.connect().close()
                except OSError:
                    return False
            return self.quiet or "listening on" in self.log()
        wait_for(ready, "the daemon to listen and log its startup line")
        if self.mode == "tcp":
            listening = self.log().split("listening on http://")[1].split()[0]
            host, _, port = listening.rpartition(":")
            self.address = (host.strip("[]"), int(port))

    def wait_exit(self, timeout=TIMEOUT):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("zeusd did not exit:\n" + self.log())

    def connect(self):
        if self.mode == "uds":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.socket_path)
        else:
            sock = socket.create_connection(self.address, timeout=TIMEOUT)
        return Connection(sock)

    def request(self, method, path, headers=None, body=b"", token=None):
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        connection = self.connect()
        try:
            return connection.request(method, path, headers, body)
        finally:
            connection.close()

    def get(self, path, token=None):
        return self.request("GET", path, token=token)

    def get_json(self, path, token=None):
        response = self.get(path, token)
        assert response.status == 200, response
        return response_json(response)

    def post(self, path, token=None):
        return self.request("POST", path, token=token)

    def stream(self, path, headers=None):
        return EventStream(self.connect(), path, headers)

    def threads(self):
        with open("/proc/%d/status" % self.process.pid) as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def node(tmp_path):
    return FakeNode(str(tmp_path))


@pytest.fixture
def start(node):
    """Start daemons on the test's node; all are stopped at the end of the test."""
    daemons = []

    def start_daemon(*args, **options):
        daemon = Daemon(node, *args, **options)
        daemons.append(daemon)
        return daemon
    yield start_daemon
    for daemon in daemons:
        daemon.stop()


@pytest.fixture(scope="session")
def shared_node():
    root = tempfile.mkdtemp(prefix="zeusd-test-")
    yield FakeNode(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(shared_node):
    """One daemon with every group, shared by tests that change nothing on the node (and by
    slow_client)."""
    started = Daemon(shared_node)
    yield started
    started.stop()


def zeusd_command(python=PYTHON):
    """How the tests run zeusd.py: `python -m zeusd` with zeusd.py's directory on PYTHONPATH
    (with_zeusd_path). The same code as `python zeusd.py`, run from the bytecode cached in
    __pycache__: a script is compiled anew on every run, a third of a daemon's start."""
    return [python, "-m", "zeusd"]


def with_zeusd_path(env):
    """env with zeusd.py's directory last on its PYTHONPATH, and bytecode written to
    __pycache__ (where it can be) whatever PYTHONDONTWRITEBYTECODE says."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), HERE]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_cli(*args, **options):
    """Run zeusd.py with arguments; (exit status, stdout, stderr)."""
    env = with_zeusd_path(dict(os.environ, **options.get("env", {})))
    result = subprocess.run(zeusd_command() + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            timeout=TIMEOUT, cwd=options.get("cwd"))
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def ask_and_leave(daemon, path, method="GET"):
    connection = daemon.connect()
    connection.send(("%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method, path)).encode())
    return connection


def errors_of(response, status):
    """The per-device errors of an {"errors": …} answer."""
    assert response.status == status, response
    body = response_json(response)
    assert list(body) == ["errors"] and body["errors"]
    return body["errors"]


def error_of(response, status):
    assert response.status == status, response
    body = response_json(response)
    assert list(body) == ["error"] and body["error"]
    return body["error"]


def one_error(got, body, status):
    """The one error message of an answer (its status and body): {"error": …} or a one-GPU
    {"errors": {…}} alike."""
    assert got == status, (got, body)
    value = json.loads(body if isinstance(body, str) else body.decode())
    messages = [value["error"]] if "error" in value else list(value["errors"].values())
    assert len(messages) == 1, value
    return messages[0]


def raw_exchange(daemon, data):
    connection = daemon.connect()
    try:
        connection.send(data)
        response = connection.response()
        assert response.headers.get("connection") == "close"
        assert connection.closed_by_peer()
        return response
    finally:
        connection.close()


def served_connection(daemon):
    """A connection that the daemon serves (a closing one may still count for a moment)."""
    def attempt():
        connection = daemon.connect()
        if connection.request("GET", "/time").status == 200:
            return connection
        connection.close()
    return wait_for(attempt, "a connection slot")


def read_all(data):
    """What RequestReader makes of data: [(method, path, query)] or an error status."""
    client, server = socket.socketpair()
    sender = threading.Thread(target=lambda: (client.sendall(data), client.shutdown(
        socket.SHUT_WR)))
    sender.start()
    reader, requests = zeusd.RequestReader(server), []
    try:
        while True:
            request = reader.next_request()
            requests.append((request.method, request.path, request.query))
    except zeusd.ConnectionClosed:
        return requests
    except zeusd.HttpError as err:
        return err.status
    finally:
        sender.join()
        client.close()
        server.close()


def flood(daemon, count):
    """Open count connections at once, then send a request on each; (served, refused) lists."""
    connections = [daemon.connect() for _ in range(count)]
    served, refused = [], []
    for connection in connections:
        connection.send(b"GET /time HTTP/1.1\r\nHost: x\r\n\r\n")
    for connection in connections:
        response = connection.response()
        assert response.status in (200, 503), response
        if response.status == 503:
            assert response_json(response) == {"error": "Too many connections"}
        (served if response.status == 200 else refused).append(connection)
    return served, refused


def close_all(daemon, connections):
    for connection in connections:
        connection.close()
    wait_for(lambda: daemon.threads() == READ_ONLY_IDLE_THREADS, "connection threads to end")


def count_events(stream, seconds):
    """Per-device events received within seconds: {gpu_id: count}."""
    counts = collections.Counter()
    deadline = time.monotonic() + seconds
    while True:
        event = stream.next_event(timeout=max(0.0, deadline - time.monotonic()))
        if event is None:
            return counts
        counts[event["gpu_id"]] += 1


def connect_from(daemon, source):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect(daemon.address)
    return Connection(sock)


def address_beyond_loopback():
    """An IPv4 address of this host outside 127.0.0.0/8, or None."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # a UDP connect only picks a route: nothing is sent
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def post(daemon, request, token_text=None):
    method, path = request.split(" ", 1)
    return daemon.request(method, path, token=token_text)


def json_body_of(response):
    assert response.status == 200, response
    return json.loads(response.body.decode())


# -- Bounded waits under way from the session's start: a hung GPU, a stop while a restore hangs,
# a client that sends half a head --

def hang_gpu_0(node, daemon):
    """Make GPU 0 of the daemon's node never answer an energy read or a power limit change, and
    set one client waiting on each (their bounds: 5 s and 10 s); daemon.energy() and
    daemon.setter() wait for their answers: (response, seconds from the request)."""
    node.update(delay={"nvmlDeviceGetTotalEnergyConsumption": {"0": 300},
                       "nvmlDeviceSetPowerManagementLimit": {"0": 300}})

    def patient(method, path):
        connection = daemon.connect()
        connection.sock.settimeout(30)
        try:
            return connection.request(method, path)
        except (OSError, EOFError) as err:  # the daemon stopped first
            return err
    daemon.energy = in_background(patient, "GET", "/gpu/get_cumulative_energy?gpu_ids=0")
    daemon.setter = in_background(patient, "POST", "/gpu/set_power_limit?gpu_ids=0&"
                                                   "power_limit_mw=200000&block=true")
    return daemon


@pytest.fixture(scope="session")
def hung():
    """(node, daemon): hang_gpu_0 on a daemon of its own, from the session's start
    (bounds_under_way), so that its bounds run out while other tests run."""
    root = tempfile.mkdtemp(prefix="zeusd-hung-")
    node = FakeNode(root)
    daemon = hang_gpu_0(node, Daemon(node, "--no-restore"))
    yield node, daemon
    daemon.process.kill()  # GPU 0 stays hung: nothing to wait for
    daemon.process.wait()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def stopping():
    """(node, daemon): a daemon stopped with SIGTERM, from the session's start
    (bounds_under_way), while a restore hangs (GPU 0's power limit setter does not answer for
    30 s): it waits the restore's 10 s bound while other tests run; daemon.exited() waits for
    its exit: (status, seconds from the signal). Before the signal, uid 1002 tried to change
    the GPU whose restore hangs (daemon.answers: uid 1001's, then uid 1002's)."""
    if not IS_ROOT or unprivileged_python() is None:
        pytest.skip("needs root, and a Python an unprivileged user can run, to run clients as "
                    "two other uids")
    root = tempfile.mkdtemp(prefix="zeusd-stopping-")
    os.chmod(root, 0o755)
    node = FakeNode(root)
    daemon = Daemon(node, "--enable", "gpu-control,gpu-read")
    alice = Client(daemon.socket_path, SET_0, uid=1001)
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": {"0": 30}})
    alice.end()
    restore_begun(node, "0")
    bob = Client(daemon.socket_path, SET_0, uid=1002)
    daemon.answers = alice.answers + bob.answers
    daemon.process.send_signal(signal.SIGTERM)
    daemon.exited = in_background(daemon.process.wait)
    yield node, daemon
    bob.end()
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slow_client(daemon):
    """A connection to the shared daemon that sent half a request head at the session's start
    (bounds_under_way), so that the 10 s header timeout runs out while other tests run."""
    connection = daemon.connect()
    connection.send(b"GET /time HTTP/1.1\r\nHost: x\r\n")
    connection.since = time.monotonic()
    yield connection
    connection.close()


BOUNDS_UNDER_WAY = ("hung", "stopping", "slow_client")


@pytest.fixture(scope="session", autouse=True)
def bounds_under_way(request):
    """Start the fixtures of BOUNDS_UNDER_WAY that the session's tests use when the session
    starts (in each xdist worker): their bounded waits run out while the other tests run, and
    a test that checks one sooner waits for what is left of it, so any order of the tests is
    right. A fixture that skips here skips again for each test that uses it."""
    used = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    for name in BOUNDS_UNDER_WAY:
        if name in used:
            try:
                request.getfixturevalue(name)
            except pytest.skip.Exception:
                pass


# -- Other users: a Python and a checkout they can run, uids, the policy tests' users and groups --

def unprivileged_python():
    """An interpreter the nobody user can run, or None."""
    for candidate in (PYTHON, "/usr/bin/python3"):
        path = os.path.realpath(candidate)
        parts = path.split(os.sep)
        if all(os.stat(os.sep.join(parts[:i]) or "/").st_mode & 0o001
               for i in range(2, len(parts))) and os.stat(path).st_mode & 0o005 == 0o005:
            return candidate
    return None


def as_nobody():
    os.setgid(65534)
    os.setgroups([])
    os.setuid(65534)


@contextlib.contextmanager
def unprivileged_checkout():
    """(python, root, node, script): a simulated node and a copy of zeusd.py in a directory
    the nobody user can use, with an interpreter it can run; the test skips without one."""
    python = unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter that an unprivileged user can run")
    root = tempfile.mkdtemp(prefix="zeusd-nobody-")
    try:
        node = FakeNode(os.path.join(root, "node"))
        script = os.path.join(root, "zeusd.py")
        shutil.copy(ZEUSD, script)
        yield python, root, node, script
    finally:
        shutil.rmtree(root, ignore_errors=True)


def open_to_everyone(root):
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o777)


SYMLINK_RACER = r'''
import os, stat, sys
path, target = sys.argv[1], sys.argv[2]
link = path + ".link"
os.symlink(target, link)
print("ready", flush=True)
while True:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.rename(link, path)
            os.symlink(target, link)
    except OSError:
        pass
'''


def as_uid(uid):
    def become():
        os.setgid(uid)
        os.setgroups([])
        os.setuid(uid)
    return become


@pytest.fixture
def public(tmp_path):
    """A socket path in a directory every user can reach, for clients of other uids."""
    directory = tempfile.mkdtemp(prefix="zeusd-public-")
    os.chmod(directory, 0o755)
    yield os.path.join(directory, "zeusd.sock")
    shutil.rmtree(directory, ignore_errors=True)


Person = collections.namedtuple("Person", "name uid gid")
PEOPLE_NAMES = ("zptml", "zptviz", "zptalice", "zptbob", "zptcarol", "zptghost")


def id_block_is_free(base, count):
    for number in range(base, base + count):
        for lookup in (pwd.getpwuid, grp.getgrgid):
            try:
                lookup(number)
                return False
            except KeyError:
                pass
    return True


def remove_people():
    for name in PEOPLE_NAMES:
        try:
            pwd.getpwnam(name)
            subprocess.call(["userdel", name], stderr=subprocess.DEVNULL)
        except KeyError:
            pass
    for name in PEOPLE_NAMES:
        try:
            grp.getgrnam(name)
            subprocess.call(["groupdel", name], stderr=subprocess.DEVNULL)
        except KeyError:
            pass


def add_people():
    """Make the groups and users of people (ids in a free block); their ids."""
    base = next(b for b in range(4300, 60000, 10) if id_block_is_free(b, 8))
    ml, viz, alice, bob, carol, ghost, stranger = range(base, base + 7)
    commands = [["groupadd", "-g", str(ml), "zptml"], ["groupadd", "-g", str(viz), "zptviz"],
                ["groupadd", "-g", str(alice), "zptalice"],
                ["groupadd", "-g", str(carol), "zptcarol"],
                ["groupadd", "-g", str(ghost), "zptghost"]]
    for name, uid, gid, extra in (("zptalice", alice, alice, ["-G", "zptml"]),
                                  ("zptbob", bob, ml, ["-G", "zptviz"]),
                                  ("zptcarol", carol, carol, [])):
        commands.append(["useradd", "-M", "-N", "-u", str(uid), "-g", str(gid), "-s",
                         "/usr/sbin/nologin"] + extra + [name])
    for command in commands:
        subprocess.check_call(command)


@contextlib.contextmanager
def node_lock(name, mode=fcntl.LOCK_EX):
    """An flock that the test processes of this machine share (pytest -n runs several)."""
    with open(os.path.join(tempfile.gettempdir(), "zeusd-test-%s.lock" % name), "a") as lock:
        fcntl.flock(lock, mode)
        yield lock


@pytest.fixture(scope="session")
def people():
    """Groups zptml and zptviz; zptalice (own group, and zptml), zptbob (primary group zptml,
    and zptviz), zptcarol (own group only); ghost, a uid with no passwd entry whose gid is the
    group zptghost; stranger, a uid with no passwd entry and no group. Fixed names, shared by
    the test processes of the machine: the first one makes them (anew: leftovers of a run that
    died are removed), each holds a shared flock on "people-users" while it uses them, and the
    last one removes them; "people" serialises the making and the removing."""
    if not IS_ROOT or unprivileged_python() is None or not shutil.which("useradd"):
        pytest.skip("needs root with useradd/groupadd, and a Python other users can run, to "
                    "run clients as users of chosen Unix groups")
    users = open(os.path.join(tempfile.gettempdir(), "zeusd-test-people-users.lock"), "a")
    try:
        with node_lock("people"):
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else uses them
                remove_people()
                add_people()
            except BlockingIOError:
                pass
            fcntl.flock(users, fcntl.LOCK_SH)
        ml, viz, ghost = (grp.getgrnam(name).gr_gid for name in ("zptml", "zptviz", "zptghost"))
        alice, bob, carol = (pwd.getpwnam(name).pw_uid for name in ("zptalice", "zptbob",
                                                                    "zptcarol"))
        stranger = ml + 6  # add_people's block
        yield {"alice": Person("zptalice", alice, alice), "bob": Person("zptbob", bob, ml),
               "carol": Person("zptcarol", carol, carol), "ghost": Person(None, ghost, ghost),
               "stranger": Person(None, stranger, stranger), "ml": ml, "viz": viz}
    finally:
        with node_lock("people"):
            fcntl.flock(users, fcntl.LOCK_UN)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last to use them
                remove_people()
            except BlockingIOError:
                pass
        users.close()


def who(person):
    """How the daemon names a UDS caller."""
    return "uid %d (%s)" % (person.uid, person.name) if person.name else "uid %d" % person.uid


def ask_as(socket_path, person, *requests):
    """Send requests as person (its uid, in a session of its own); [[status, body], ...]."""
    client = Client(socket_path, *requests, uid=person.uid)
    client.end()
    return client.answers


def run_as(person, *argv):
    """A process of person's uid (stdin a pipe: it ends when the pipe closes, or is killed)."""
    return subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=as_uid(person.uid))


def sleeper(person):
    return run_as(person, "sleep", "120")


def stop_process(process):
    process.kill()
    process.wait()


THREADS = r'''
import json, sys, threading
threading.stack_size(65536)
count, started, lock, stop = int(sys.argv[1]), [], threading.Lock(), threading.Event()
def run():
    with lock:
        started.append(threading.get_native_id())
    stop.wait()
for _ in range(count):
    threading.Thread(target=run, daemon=True).start()
while len(started) < count:
    stop.wait(0.002)
print(json.dumps(started), flush=True)
sys.stdin.read()
'''


# -- Holders: clients in sessions of their own, the state directory and holds.json --

HOLDER = r'''
"""A client in a session of its own: sends each request over the socket, prints each answer
as a JSON line, then stays until its stdin closes, or leaves a child behind and exits."""
import json, os, socket, sys, time
path, mode = sys.argv[1], sys.argv[2]
for line in sys.argv[3:]:
    method, target = line.split(" ", 1)
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(("%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
               % (method, target)).encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    print(json.dumps([int(head.split()[1]), body.decode()]), flush=True)
if mode == "stay":
    sys.stdin.read()
elif mode == "leave-a-child":
    if os.fork() == 0:
        time.sleep(30)
    os._exit(0)
'''


class Client(object):
    """HOLDER as a session leader (as uid, when given; run by the prefix command, when given),
    with the answers to its requests."""

    def __init__(self, socket_path, *requests, **options):
        uid = options.get("uid")
        python = unprivileged_python() if uid is not None else sys.executable
        self.process = subprocess.Popen(
            options.get("prefix", []) + [python, "-c", HOLDER, socket_path,
                                         options.get("mode", "stay")] + list(requests),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
            preexec_fn=as_uid(uid) if uid is not None else None)
        self.answers = [json.loads(self.process.stdout.readline().decode())
                        for _ in requests]
        self.pid = self.process.pid

    def end(self):
        """End the session (its leader exits); when it ended."""
        self.process.stdin.close()
        self.process.wait(TIMEOUT)
        return time.monotonic()


SET_0_PATH = "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&block=true"
SET_0 = "POST " + SET_0_PATH
RESTORE_CALLS = [("nvmlDeviceSetPowerManagementLimit", "0", "300000"),
                 ("nvmlDeviceSetPersistenceMode", "0", "1"),
                 ("nvmlDeviceResetGpuLockedClocks", "0"),
                 ("nvmlDeviceResetMemoryLockedClocks", "0")]


def setters(node, gpu="0"):
    return [call for call in node.calls(*POWER_SETTERS) if call[1] == gpu]


def state_file(node):
    with open(os.path.join(node.root, "state", "holds.json")) as holds:
        return json.load(holds)["holds"]


def restored_within(daemon, node, since, count=1, seconds=2.0):
    """Wait for the count-th restore audit line; seconds it took after since (asserted <)."""
    wait_for(lambda: daemon.log().count("audit: restore gpu=") >= count, "a restore",
             timeout=seconds + 2)
    took = time.monotonic() - since
    assert took < seconds, took
    return took


SET_1_PATH = "/gpu/set_power_limit?gpu_ids=1&power_limit_mw=200000&block=true"
SAVED = {"power_limit_mw": 250000, "persistence_mode": False, "gpu_locked_clocks": "reset",
         "mem_locked_clocks": "reset"}


def hold_record(daemon, sessions, uid=1001, user=None, hold_id="0123456789abcdef"):
    """A hold as the state file records it: made by daemon ([pid, start time]) for sessions."""
    return {"id": hold_id, "uid": uid, "user": user, "exp": None, "sessions": sessions,
            "since_ms": 1, "daemon": daemon, "saved": dict(SAVED)}


def write_state_file(node, holds, separators=None):
    """holds.json as a daemon of the node leaves it (directory 0700, file 0600); its path."""
    state = os.path.join(node.root, "state")
    if not os.path.isdir(state):
        os.mkdir(state, 0o700)
    path = os.path.join(state, "holds.json")
    with open(path, "w") as holds_file:
        json.dump({"holds": holds}, holds_file, separators=separators)
    os.chmod(path, 0o600)
    return path


def this_process():
    """[pid, start time] of this process: a daemon still running, as a hold's record sees it."""
    with open("/proc/self/stat") as stat_file:
        return [os.getpid(), int(stat_file.read().rpartition(")")[2].split()[19])]


def moved_aside(node):
    return [name for name in os.listdir(os.path.join(node.root, "state"))
            if name.startswith("holds.json.bad-")]


def restore_begun(node, gpu):
    """Wait until the restore of a GPU has called its (slow) power limit setter."""
    wait_for(lambda: ("nvmlDeviceSetPowerManagementLimit", gpu, "300000") in setters(node, gpu),
             "the restore of GPU %s to begin" % gpu)


def error_lines(daemon):
    return [line for line in daemon.log().splitlines() if " ERROR " in line]


MANY_SESSIONS = r'''
"""Leads sessions of its own, one after the other, each sending one request over the socket
and printing its answer as a JSON line; all stay until stdin closes."""
import json, os, socket, sys
path, count, request = sys.argv[1], int(sys.argv[2]), sys.argv[3]
method, target = request.split(" ", 1)
for _ in range(count):
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.close(read_end)
        os.setsid()
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(("%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                   % (method, target)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        os.write(write_end, json.dumps([int(head.split()[1]), body.decode()]).encode())
        os.close(write_end)
        sys.stdin.read()
        os._exit(0)
    os.close(write_end)
    answer = b""
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        answer += chunk
    os.close(read_end)
    print(answer.decode(), flush=True)
sys.stdin.read()
'''


def may_choose_pids():
    """Whether this process may set the next pid (/proc/sys/kernel/ns_last_pid)."""
    if not IS_ROOT:
        return False
    try:
        with open("/proc/sys/kernel/ns_last_pid", "r+") as last:
            last.write(last.read().strip())
        return True
    except OSError:
        return False


def start_with_pid(pid, argv, **options):
    """argv started as a process that gets pid (free now), through ns_last_pid; None if other
    processes took it first every time."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as last:
            last.write(str(pid - 1))
        process = subprocess.Popen(argv, **options)
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
    return None


def unshared_pid(daemon):
    """The pid of a daemon started by `unshare --fork` (which blocks SIGTERM itself)."""
    with open("/proc/%d/task/%d/children" % ((daemon.process.pid,) * 2)) as children:
        return int(children.read().split()[0])


def setters_since(node, count):
    return node.calls(*POWER_SETTERS)[count:]


HOLD_0 = "POST /gpu/hold?gpu_ids=0"


# -- Receipts: receipts.jsonl as the daemon writes it, and what zeusd receipts reads --

SAVED_AT_START = {"power_limit_mw": 300000, "persistence_mode": True,
                  "gpu_locked_clocks": "reset", "mem_locked_clocks": "reset"}


def state_path(node, *names):
    return os.path.join(node.root, "state", *names)


def receipt_file_lines(node, name="receipts.jsonl"):
    path = state_path(node, name)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as receipts_file:
        return receipts_file.read().decode().splitlines()


def receipts_on_file(node):
    return [json.loads(line) for line in receipt_file_lines(node)]


def wait_receipts(node, count, timeout=TIMEOUT):
    return wait_for(lambda: len(receipts_on_file(node)) >= count and receipts_on_file(node),
                    "%d receipt(s) in receipts.jsonl" % count, timeout)


def energy_reads(node, gpu):
    return [call for call in node.calls("nvmlDeviceGetTotalEnergyConsumption") if call[1] == gpu]


def receipts_cli(node, *args):
    return run_cli("receipts", "--state-dir", state_path(node), *args)


def make_symlink(path, node):
    target = os.path.join(node.root, "elsewhere")
    with open(target, "w") as elsewhere:
        elsewhere.write("untouched\n")
    os.symlink(target, path)


def make_fifo(path, node):
    os.mkfifo(path, 0o600)


def make_foreign(path, node):
    with open(path, "w") as foreign:
        foreign.write("")
    os.chmod(path, 0o600)
    os.chown(path, 1001, 1001)


def make_readable(path, node):
    with open(path, "w") as readable:
        readable.write("")
    os.chmod(path, 0o644)


def write_receipts(node, receipts):
    directory = state_path(node)
    if not os.path.isdir(directory):
        os.mkdir(directory, 0o700)
    fd = os.open(os.path.join(directory, "receipts.jsonl"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"".join(json.dumps(receipt).encode() + b"\n" for receipt in receipts))
    os.close(fd)


def a_receipt(hold, gpu, user, job, until_ms, energy_j):
    return collections.OrderedDict([
        ("hold", hold), ("gpu", gpu), ("uuid", "GPU-%08x-0000-0000-0000-000000000000" % gpu),
        ("uid", {"alice": 1001, "bob": 1002}.get(user)), ("user", user), ("job", job),
        ("since_ms", until_ms - 60000), ("until_ms", until_ms), ("energy_j", energy_j),
        ("changes", []), ("saved", SAVED_AT_START), ("reason", "released"), ("restore", "ok")])


HIGH_WATER = r'''
import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write([line for line in open("/proc/self/status")
                                          if line.startswith("VmHWM")][0]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def peak_kib(node, *args):
    """`zeusd receipts` on the node's state directory: (exit status, stdout, the peak of its
    resident memory, VmHWM, in KiB)."""
    result = subprocess.run(
        [PYTHON, "-c", HIGH_WATER, ZEUSD, "receipts", "--state-dir", state_path(node)]
        + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    peak = re.search(r"VmHWM:\s*([0-9]+) kB", result.stderr.decode())
    return result.returncode, result.stdout.decode(), int(peak.group(1))


def readme_epilog():
    """The README's one epilog (section "Slurm: per-job tokens and the epilog"), as written."""
    with open(os.path.join(HERE, "README.md")) as readme:
        text = readme.read()
    return re.search(r"# /etc/slurm/epilog.sh .*?\n(\[ -n \"\$SLURM_JOB_GPUS.*?\nexit 0)\n",
                     text, re.S).group(1)


# -- cgroups: a session leader in a Slurm job's cgroup --

CGROUP_ROOTS = {"v1": "/sys/fs/cgroup/freezer", "v2": "/sys/fs/cgroup/unified"}


CGROUPS_MADE = {}  # a cgroup's path: (the node lock held, the directories made for it)


def make_cgroup(version, *components):
    """A cgroup (v1: the freezer hierarchy, v2: the unified one) at components under the
    hierarchy's root, where slurmd makes a job's (zeusd takes job ids from there only); its
    path, or a skip when this machine does not let the test make one. The paths are fixed:
    the "cgroups" node lock is held until remove_cgroup."""
    root = CGROUP_ROOTS[version]
    if not IS_ROOT or not os.path.isdir(root):
        pytest.skip("needs root and a writable cgroup %s hierarchy at %s" % (version, root))
    path, made, lock = root, [], node_lock("cgroups")
    lock.__enter__()
    CGROUPS_MADE[os.path.join(root, *components)] = lock, made
    try:
        for component in components:
            path = os.path.join(path, component)
            if not os.path.isdir(path):
                os.mkdir(path)
                made.append(path)
    except OSError as err:
        remove_cgroup(os.path.join(root, *components))
        pytest.skip("cannot make a cgroup at %s: %s" % (path, err))
    return os.path.join(root, *components)


def remove_cgroup(path):
    """Remove the directories that make_cgroup made for path (once its processes are gone)."""
    lock, made = CGROUPS_MADE.pop(path)
    try:
        for directory in reversed(made):
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    os.rmdir(directory)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.02)
    finally:
        lock.__exit__(None, None, None)


def in_cgroup(path):
    """A Client prefix that moves the session leader into the cgroup, then runs the client."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', path]


# -- Tokens: signing keys, forged and issued tokens, a daemon with auth --

KEY = b"c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY=\n"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header, claims, key=KEY):
    """A token with any header and claims, signed HS256 with key."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def token(scopes, exp="default", sub="alice", key=KEY):
    claims = {"sub": sub, "scopes": scopes}
    if exp == "default":
        claims["exp"] = int(time.time()) + 3600
    elif exp != "absent":
        claims["exp"] = exp
    return forge({"alg": "HS256", "typ": "JWT"}, claims, key)


def verify(value):
    return zeusd.verify_token(KEY, value)


def forge_raw(header, payload, key=KEY):
    """A token from raw header and payload bytes, signed HS256 with key."""
    signing_input = b64(header) + "." + b64(payload)
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


@pytest.fixture
def key_path(node):
    path = os.path.join(node.root, "signing.key")
    with open(path, "wb") as key_file:
        key_file.write(KEY)
    os.chmod(path, 0o600)
    return path


def issue_cli(key_path, *args):
    return run_cli("token", "issue", "--signing-key-path", key_path, *args)


@pytest.fixture
def auth_daemon(key_path, start):
    return start("--signing-key-path", key_path, "--enable", "gpu-read,cpu-read,gpu-control")


def gpu_token(gpus, scopes=("gpu-read", "gpu-control")):
    claims = {"sub": "job42", "scopes": list(scopes), "gpus": gpus}
    return forge({"alg": "HS256", "typ": "JWT"}, claims)


CONTROL = ["gpu-read", "gpu-control"]


def claims_token(**claims):
    claims.setdefault("scopes", CONTROL)
    claims.setdefault("exp", int(time.time()) + 3600)
    return forge({"alg": "HS256", "typ": "JWT"}, claims)


def write_key(directory):
    path = os.path.join(directory, "policy-signing.key")
    with open(path, "wb") as key_file:
        key_file.write(KEY)
    os.chmod(path, 0o600)
    return path


# -- Requests and policies: control requests, policy files, the shared policed daemon --

def set_limit(gpus, watts, block=True):
    return "POST /gpu/set_power_limit?gpu_ids=%s&power_limit_mw=%d&block=%s" % (
        gpus, int(round(watts * 1000)), "true" if block else "false")


def clocks(kind, gpus, low, high):
    return "POST /gpu/set_%s_locked_clocks?gpu_ids=%s&min_clock_mhz=%d&max_clock_mhz=%d&" \
           "block=true" % (kind, gpus, low, high)


def persistence(gpus):
    return "POST /gpu/set_persistence_mode?gpu_ids=%s&enabled=true&block=true" % gpus


def write_policy(directory, text, name="policy.toml"):
    """A policy file as an admin writes it (root's, mode 644), replaced atomically."""
    path = os.path.join(directory, name)
    temp = path + ".new"
    with open(temp, "w") as policy_file:
        policy_file.write(textwrap.dedent(text).lstrip("\n"))
    os.chmod(temp, 0o644)
    os.replace(temp, path)
    return path


def sighup_and_wait(daemon, fragment):
    """SIGHUP the daemon; wait until its log has one more line with fragment."""
    before = daemon.log().count(fragment)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.log().count(fragment) > before, "the daemon to log " + fragment)


def exits_of(root, paths):
    """`serve --policy PATH` for each path, all started at once (a node each): [(exit status,
    log)]."""
    daemons = []
    for i, path in enumerate(paths):
        node = FakeNode(os.path.join(root, "node%d" % i))
        daemons.append(Daemon(node, "--policy", path, "--no-restore", wait=False))
    return [(daemon.wait_exit(), daemon.log()) for daemon in daemons]


def lint_error(path):
    """What `zeusd policy check` (load_policy without a GPU count) says of the file."""
    with pytest.raises(zeusd.StartupError) as refused:
        zeusd.load_policy(path)
    return str(refused.value)


def trust_case(root, kind):
    """A policy path that the daemon must not trust or read, and what its error says."""
    path = os.path.join(root, "policy.toml")
    good = "[default]\ngpus = 'all'\npower_limit_w = true\n"
    if kind == "symlink-to-world-writable":
        target = os.path.join(root, "open.toml")
        with open(target, "w") as target_file:
            target_file.write(good)
        os.chmod(target, 0o666)
        os.symlink(target, path)
        return path, "is writable by everyone (mode 666)"
    if kind == "fifo":
        os.mkfifo(path)
        return path, "not a regular file"
    if kind == "device":
        return "/dev/zero", "not a regular file"
    if kind == "huge":
        with open(path, "w") as policy_file:
            policy_file.write(good + "#" * 65536 + "\n")
        os.chmod(path, 0o644)
        return path, "larger than 65536 bytes"
    if kind == "missing":
        return path, "No such file or directory"
    if kind == "owned-by-another-user":
        with open(path, "w") as policy_file:
            policy_file.write(good)
        os.chown(path, 4242, 4242)
        return path, "is owned by uid 4242, neither root nor the daemon's user"
    if kind == "not-utf8":
        with open(path, "wb") as policy_file:
            policy_file.write(b"[default]\n# \xff\n")
        return path, "cannot read"
    raise AssertionError(kind)


MAIN_POLICY = """
    [node]
    gpu_power_budget_w = 2400

    [default]
    gpus = [2]
    power_limit_w = [150, 250]

    [group.zptml]
    gpus = [0, 1]
    power_limit_w = [200, 400]
    gpu_locked_clocks_mhz = [900, 1980]

    [group.zptviz]
    gpus = [1, 2]
    power_limit_w = [250, 500]
    mem_locked_clocks_mhz = [800, 1600]
    persistence_mode = true

    [group.zptghost]
    gpus = [1]
    power_limit_w = true

    [user.zptalice]
    gpus = "all"
    power_limit_w = true
    """
BOB_TABLE = "group.zptml, group.zptviz"


@pytest.fixture(scope="module")
def policed(people):
    """A daemon with MAIN_POLICY, no holds, on a socket every user can reach."""
    root = tempfile.mkdtemp(prefix="zeusd-policy-")
    os.chmod(root, 0o755)
    node = FakeNode(os.path.join(root, "node"))
    os.chmod(node.root, 0o755)
    path = write_policy(root, MAIN_POLICY)
    daemon = Daemon(node, "--policy", path, "--no-restore")
    daemon.policy_path = path
    yield daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


def nothing_allowed():
    return {"power_limit_mw": None, "gpu_locked_clocks_mhz": None, "mem_locked_clocks_mhz": None,
            "persistence_mode": False, "in_use_by": []}


def allowed(power=None, gpu_clocks=None, mem_clocks=None, persistence=False):
    return {"power_limit_mw": power, "gpu_locked_clocks_mhz": gpu_clocks,
            "mem_locked_clocks_mhz": mem_clocks, "persistence_mode": persistence,
            "in_use_by": []}


def view_of(answers):
    status, body = answers
    assert status == 200, answers
    return json.loads(body)


def policy_checks(*argvs):
    """`zeusd policy check ARGS` for each argv, run side by side: [(status, out, err)]."""
    runs = [subprocess.Popen([PYTHON, ZEUSD, "policy", "check"] + list(argv),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for argv in argvs]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=TIMEOUT)
        results.append((run.returncode, out.decode(), err.decode()))
    return results


def in_use_message(gpu, *persons):
    return "GPU %d is in use by processes of %s: only they or root may change its settings." % (
        gpu, ", ".join(who(person) for person in persons))


def budget_message(budget, gpus, watts, total):
    return "The node's GPU power budget is %d W: with GPU%s %s at %g W its GPUs' power limits " \
           "would total %g W, %g W over." % (budget, "s" if len(gpus) > 1 else "",
                                             ", ".join(map(str, gpus)), watts, total,
                                             total - budget)


BUDGET_POLICY = """
    [node]
    gpu_power_budget_w = %d
    [default]
    gpus = "all"
    power_limit_w = true
    """


def fire_together(count, send):
    """Run send(i) for i in range(count) on threads released at once; their results."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(i):
        barrier.wait()
        results[i] = send(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def replay_within_budget(node, budget_mw, start_limits):
    """Replay the power limit changes in the call log in order; assert no step passed the
    budget; the final limits."""
    limits = dict(start_limits)
    for call in node.calls("nvmlDeviceSetPowerManagementLimit"):
        limits[int(call[1])] = int(call[2])
        assert sum(limits.values()) <= budget_mw, (call, limits)
    return limits


RAISES = [(i % 3, 350 + i) for i in range(8)]  # each alone: 950 + i W, within 1000 W


# -- GPU command overrides: scripts in place of NVML calls --

def write_script(directory, name, body):
    path = os.path.join(directory, name)
    with open(path, "w") as script:
        script.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def overrides(node):
    """Scripts that record their arguments, fail, print an error, or hang, and a writer of
    override files that name them as @ok, @fail, @print and @hang."""
    directory = os.path.join(node.root, "scripts")
    os.mkdir(directory)
    record = os.path.join(directory, "record.txt")
    scripts = {
        "ok": write_script(directory, "ok.sh", 'echo "$0 $*" >> %s\n' % record),
        "fail": write_script(directory, "fail.sh", 'echo "no such GPU" >&2\nexit 1\n'),
        "print": write_script(directory, "print.sh", 'echo "Error: unable to set"\n'),
        "hang": write_script(directory, "hang.sh", 'echo "$$" > %s.pid\nsleep 30\n' % record),
    }

    def write(text, mode=0o644):
        path = os.path.join(node.root, "overrides.toml")
        with open(path, "w") as override_file:
            for name, script in scripts.items():
                text = text.replace("@" + name, script)
            override_file.write(text)
        os.chmod(path, mode)
        return path

    def recorded():
        if not os.path.exists(record):
            return []
        with open(record) as record_file:
            return [line.split()[1:] for line in record_file]
    write.recorded = recorded
    write.pid_file = record + ".pid"
    return write


# -- Metrics and Prometheus --

def scrape(daemon, token_text=None):
    """{(name, frozenset of label pairs): value} of a /metrics answer."""
    response = daemon.get("/metrics", token=token_text)
    assert response.status == 200, response
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for line in response.body.decode().splitlines():
        if line.startswith("#") or not line:
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        pairs = frozenset(tuple(item.split("=", 1)) for item in
                          re.findall(r'[a-z_]+="[^"]*"', labels))
        samples[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return samples


def series(samples, family, **labels):
    return samples.get((family, frozenset((k, str(v)) for k, v in labels.items())))


def daemon_python_version():
    return subprocess.run([PYTHON, "-c", "import sys; print(sys.version.split()[0])"],
                          stdout=subprocess.PIPE).stdout.decode().strip()


def prometheus_tool(name):
    directory = os.environ.get("ZEUSD_TEST_PROMETHEUS_DIR")
    path = os.path.join(directory, name) if directory else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        pytest.skip("no %s: set ZEUSD_TEST_PROMETHEUS_DIR to a directory holding it (.ci/run "
                    "unpacks Debian's prometheus package there)" % name)
    return path


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- zeusd status, and a hostile server for it --

def status_cli(*args, **options):
    return run_cli("status", *args, **options)


class HostileServer(object):
    """A TCP server that answers every request with what answer(path) returns, as raw bytes."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.reply, args=(sock,), daemon=True).start()

    def reply(self, sock):
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                request += sock.recv(4096)
            for piece in self.answer(request.split()[1].decode()):
                if isinstance(piece, float):
                    time.sleep(piece)
                else:
                    sock.sendall(piece)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self):
        self.listener.close()


def http_answer(body, status=200, server="evil"):
    data = json.dumps(body).encode()
    return [b"HTTP/1.1 %d X\r\nServer: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status, server.encode("utf-8"), len(data), data)]


def ctrl_c_works():
    """Give a child the default SIGINT (a shell that runs the tests in the background ignores
    it, and Python then installs no KeyboardInterrupt for ^C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- The real Zeus clients --

ZEUS_PYTHONS = {"0.15": os.environ.get("ZEUSD_TEST_ZEUS_0_15"),
                "0.16": os.environ.get("ZEUSD_TEST_ZEUS_0_16")}


# The flags each Zeus release needs: 0.16 (pip install zeus today) works with the defaults.
STREAM_FORMAT_OF = {"0.15": ("--stream-format", "all-devices"), "0.16": ()}
CPU_TICKS = {"intel-rapl:0": (1000000, 50.0), "intel-rapl:1": (7, 20.0)}


# Put before each script that a Zeus client's Python runs: zeus.monitor imports sklearn.metrics
# for auc, which no client here calls; a stand-in that fails if called saves the ~2 s of CPU
# that importing scikit-learn (and SciPy) takes in each client process.
ZEUS_WITHOUT_SKLEARN = r'''
import sys as _sys, types as _types
def _unused(*args, **kwargs):
    raise AssertionError("the tests' stand-in for sklearn was called")
_sys.modules["sklearn"] = _types.ModuleType("sklearn")
_sys.modules["sklearn.metrics"] = _sys.modules["sklearn"].metrics = _types.ModuleType("metrics")
_sys.modules["sklearn.metrics"].auc = _unused
'''


ZEUS_CLIENT = r'''
"""Drive the Zeus library against a daemon; print what each call gave, as JSON."""
import dataclasses, json, sys, time
from zeus.utils.zeusd import ZeusdClient, ZeusdConfig
from zeus.monitor.power_streaming import PowerStreamingClient
from zeus.device.exception import ZeusdError

mode, address, token = sys.argv[1], sys.argv[2], sys.argv[3] or None
if mode == "uds":
    def config(**kw): return ZeusdConfig.uds(address, token=token, **kw)
else:
    host, port = address.rsplit(":", 1)
    def config(**kw): return ZeusdConfig.tcp(host, int(port), token=token, **kw)


def plain(value):
    if dataclasses.is_dataclass(value):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in sorted(value) if True] if isinstance(value, (set, frozenset)) \
            else [plain(v) for v in value]
    return value


out = {}
client = ZeusdClient(config())
out["discovery"] = plain({"gpu_ids": client.gpu_ids, "cpu_ids": client.cpu_ids,
                          "dram": client.dram_available, "auth": client.auth_required,
                          "read": client.can_read_gpu, "control": client.can_control_gpu})
calls = {
    "gpu_power": lambda: client.get_gpu_power(),
    "gpu_power_2": lambda: client.get_gpu_power([2]),
    "gpu_energy": lambda: client.get_gpu_energy([0, 2]),
    "cpu_energy": lambda: client.get_cpu_energy([0, 1]),
    "cpu_power": lambda: client.get_cpu_power([0, 1]),
    "time": lambda: client.get_time(),
    "set_power_limit": lambda: client.set_power_limit([0, 1], 250000, True),
    "set_power_limit_bad": lambda: client.set_power_limit([0], 900000, True),
    "set_persistence_mode": lambda: client.set_persistence_mode([1], False, True),
    "set_gpu_locked_clocks": lambda: client.set_gpu_locked_clocks([0], 900, 1410, True),
    "reset_gpu_locked_clocks": lambda: client.reset_gpu_locked_clocks([0], True),
    "set_mem_locked_clocks": lambda: client.set_mem_locked_clocks([2], 1593, 2619, False),
    "reset_mem_locked_clocks": lambda: client.reset_mem_locked_clocks([2], True),
}
for name in ("get_persistence_mode", "get_power_limit", "get_power_limit_constraints"):
    if hasattr(client, name):
        calls[name] = (lambda method: lambda: method([0]))(getattr(client, name))
for name, call in calls.items():
    try:
        out[name] = plain(call())
    except (ZeusdError, Exception) as err:
        out[name] = {"raised": type(err).__name__, "message": str(err)}

streaming = PowerStreamingClient(servers=[config(
    gpu_indices=[0, 2], cpu_indices=[0, 1] if client.can_read_cpu else [])])
deadline = time.monotonic() + 8
readings = {}
while time.monotonic() < deadline:
    readings = plain(streaming.get_power())
    reading = next(iter(readings.values()), {})
    if len(reading.get("gpu_power_w", {})) == 2 and \
            len(reading.get("cpu_power_w", {})) == (2 if client.can_read_cpu else 0):
        break
    time.sleep(0.05)
streaming.stop()
out["stream"] = readings

try:
    from zeus.device.gpu.nvidia import ZeusdNVIDIAGPU
    gpu = ZeusdNVIDIAGPU(1, client)
    gpu.set_power_management_limit(220000)
    gpu.set_persistence_mode(True)
    gpu.set_gpu_locked_clocks(1000, 1500)
    gpu.reset_gpu_locked_clocks()
    gpu.set_memory_locked_clocks(1593, 1593)
    gpu.reset_memory_locked_clocks(block=False)
    out["zeusd_gpu"] = "ok"
except Exception as err:
    out["zeusd_gpu"] = {"raised": type(err).__name__, "message": str(err)}
print(json.dumps(out))
'''


def run_zeus_clients(version, daemon, tokens):
    """Run ZEUS_CLIENT under that Zeus version's Python against daemon, one client per token
    ("": none), side by side; the JSON output of each."""
    python = ZEUS_PYTHONS[version]
    if not python:
        pytest.skip("set ZEUSD_TEST_ZEUS_%s to a Python with zeus==%s.0 (.ci/run does)"
                    % (version.replace(".", "_"), version))
    address = daemon.socket_path if daemon.mode == "uds" else "%s:%d" % daemon.address
    env = dict(os.environ, PYTHONPATH=daemon.node.lib, FAKE_NVML_STATE=daemon.node.state_path,
               FAKE_NVML_LOG=daemon.node.log_path)
    for name in ("ZEUSD_SOCK_PATH", "ZEUSD_HOST_PORT", "ZEUSD_TOKEN"):
        env.pop(name, None)
    script = ZEUS_WITHOUT_SKLEARN + ZEUS_CLIENT
    clients = [subprocess.Popen([python, "-c", script, daemon.mode, address, token],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env) for token in tokens]
    outputs = []
    for client in clients:
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err.decode()[-3000:]
        outputs.append(json.loads(out.decode().strip().splitlines()[-1]))
    return outputs


ZEUS_POLICY_CLIENT = r'''
import json, sys
from zeus.utils.zeusd import ZeusdClient, ZeusdConfig
from zeus.device.gpu.nvidia import ZeusdNVIDIAGPU
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = ZeusdClient(ZeusdConfig.tcp(host, port, token=token))
out = {"constraints": {str(k): list(v) for k, v in
                       client.get_power_limit_constraints([0, 1]).items()}}
gpu = ZeusdNVIDIAGPU(0, client)
out["gpu_constraints"] = list(gpu.get_power_management_limit_constraints())
try:
    gpu.set_power_management_limit(260000)  # (the local NVML says 300000: it asks the daemon)
    out["set_260"] = "ok"
except Exception as err:
    out["set_260"] = [type(err).__name__, str(err)]
gpu.set_power_management_limit(200000)
out["set_200"] = "ok"
print(json.dumps(out))
'''


# ==== Ground: configuration, logging, errors, files, the TOML subset, /proc ====


# ---- Configuration: durations ----

@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("7d", 604800), ("2w", 1209600),
    ("30days", 2592000), ("1 hour 30 minutes", 5400), ("never", None), ("NEVER", None),
    ("0", None), ("10sec", 10), ("3hrs", 10800),
])
def test_parse_duration(text, seconds):
    assert zeusd.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "1y", "1.5h", "-1h", "0s", "1h x", "99999999999w"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        zeusd.parse_duration(text)


# ---- Logging: request and audit lines, levels, volume, priorities, client text escaped ----

def test_request_log_lines_and_level(node, key_path, start):
    daemon = start("--enable", "gpu-read", env={"ZEUSD_LOG": "debug"})
    caller = "uid=%d pid=%d" % (os.getuid(), os.getpid())
    daemon.get("/gpu/get_power?gpu_ids=0")
    daemon.get("/gpu/get_power?gpu_ids=9")
    raw_exchange(daemon, b"BAD\r\n\r\n")
    lines = [" INFO %s GET /gpu/get_power?gpu_ids=0 200 " % caller,
             " INFO %s GET /gpu/get_power?gpu_ids=9 400 " % caller,
             "ms: Unknown GPU indices: [9]. Available: [0, 1, 2]",
             " INFO %s - - 400: Malformed request line." % caller]
    # each written once its reply is sent, so in any order
    wait_for(lambda: all(line in daemon.log() for line in lines), "the request lines")
    log_text = daemon.log()
    assert re.search(r" DEBUG nvmlDeviceGetFieldValues: [0-9.]+ us", log_text)
    assert " ERROR " not in log_text
    tcp = start("--signing-key-path", key_path, "--enable", "gpu-read", mode="tcp")
    secret = token(["gpu-read"])
    client = tcp.connect()
    assert client.request("GET", "/auth/whoami", {"Authorization": "Bearer " + secret}
                          ).status == 200
    port = client.sock.getsockname()[1]
    client.close()
    wait_for(lambda: "GET /auth/whoami" in tcp.log(), "the request line")
    assert " INFO 127.0.0.1:%d user=alice GET /auth/whoami 200 " % port in tcp.log()
    assert secret not in tcp.log() and secret.split(".")[2] not in tcp.log()
    quiet = start(env={"ZEUSD_LOG": "warning"})
    quiet.get("/time")
    quiet.stop()
    assert "GET /time" not in quiet.log() and "listening on" not in quiet.log()


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def test_nothing_a_client_sends_starts_a_log_line(auth_daemon):
    forged = "alice\n2030-01-01 00:00:00,000 INFO POST /gpu/set_power_limit 200 1.00ms user=root"
    for sub in (forged, forged.replace("\n", "\r"), forged.replace("\n", "\u2028")):
        assert auth_daemon.get("/auth/whoami", token=token([], sub=sub)).status == 200
    invisible = "alice\u202e\u2066\u200b\ufeff\U000e0041"
    assert auth_daemon.get("/auth/whoami", token=token([], sub=invisible)).status == 200
    auth_daemon.get("/gpu/get_power?gpu_ids=0%0A2030-01-01", token=token(["gpu-read"]))
    raw_exchange(auth_daemon, b"GET /time HTTP/1.1\r\nX: \x1b[2J\r\n\r\n")
    wait_for(lambda: auth_daemon.log().count("GET /auth/whoami 200") == 4, "the request lines")
    lines = auth_daemon.log().splitlines()
    assert all(LOG_LINE.match(line) for line in lines), lines
    assert not any("user=root" in line and "user=alice" not in line for line in lines)
    assert "user=alice\\u202e\\u2066\\u200b\\ufeff\\U000e0041 GET" in auth_daemon.log()
    assert all(line.isprintable() for line in lines)


def test_request_lines_are_summarised_past_100_a_second_audit_lines_never(node, start):
    daemon = start()
    connection = daemon.connect()
    for _ in range(600):
        connection.send(b"GET /time HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.response().status == 200
    assert daemon.post("/gpu/set_persistence_mode?gpu_ids=2&enabled=false&"
                       "block=true").status == 200
    wait_for(lambda: "request lines left out" in daemon.log(), "the summary line")
    text = daemon.log()
    written = len(re.findall(r" (GET /time|POST /gpu/set_persistence_mode\S+) 200 ", text))
    summaries = re.findall(r"(\d+) request lines left out \(over 100 a second\), by status: "
                           r"200: (\d+)", text)
    assert written <= 300 and written + sum(int(n) for n, _ in summaries) == 601, (written,
                                                                                   summaries)
    assert "audit: uid=%d" % os.getuid() in text
    quiet = start(env={"ZEUSD_LOG": "warning"}, socket_name="quiet.sock")
    assert quiet.post("/gpu/set_persistence_mode?gpu_ids=2&enabled=false&block=true").status \
        == 200
    wait_for(lambda: "audit: " in quiet.log(), "the audit line at ZEUSD_LOG=warning")
    assert " INFO audit: " in quiet.log() and "POST /gpu/set_persistence_mode" not in quiet.log()


def test_lines_carry_syslog_priorities_when_stderr_is_the_journal(node, start):
    log_path = os.path.join(node.root, "journal.log")
    with open(log_path, "wb") as log_file:
        info = os.fstat(log_file.fileno())
    daemon = start("--enable", "gpu-read", "--num-workers", "2", log_path=log_path,
                   env={"JOURNAL_STREAM": "%d:%d" % (info.st_dev, info.st_ino)})
    daemon.get("/time")
    wait_for(lambda: "GET /time" in daemon.log(), "the request line")
    lines = daemon.log().splitlines()
    assert any(line.startswith("<6>zeusd %s listening on" % zeusd.__version__) for line in lines)
    assert any(line.startswith("<6>uid=") and "GET /time 200" in line for line in lines)
    assert all(re.match(r"<[3467]>", line) for line in lines), lines


# ---- Files: only small regular files are read ----

def test_files_that_are_not_small_regular_files_are_refused(node, key_path, start, overrides):
    fifo = os.path.join(node.root, "fifo")
    os.mkfifo(fifo)
    for flag in ("--gpu-command-overrides", "--signing-key-path"):
        daemon = start(flag, fifo, wait=False)
        assert daemon.wait_exit() == 1 and "not a regular file" in daemon.log()
    huge = os.path.join(node.root, "huge.key")
    with open(huge, "wb") as huge_file:
        huge_file.write(b"k" * 70000)
    daemon = start("--signing-key-path", huge, wait=False)
    assert daemon.wait_exit() == 1 and "larger than 65536 bytes" in daemon.log()
    daemon = start("--signing-key-path", key_path, socket_name="rotating.sock")
    os.unlink(key_path)
    os.mkfifo(key_path)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the current signing key" in daemon.log(), "the FIFO refused")
    os.unlink(key_path)
    os.symlink("/dev/zero", key_path)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.log().count("keeping the current signing key") == 2,
             "/dev/zero refused")
    assert daemon.get("/auth/whoami", token=token([])).status == 200
    stopped, seconds = timed(lambda: (daemon.process.send_signal(signal.SIGTERM),
                                      daemon.wait_exit()))
    assert stopped[1] == 0 and seconds < 2
    assert "Traceback" not in daemon.log() and "MemoryError" not in daemon.log()


# ---- TOML subset: read as tomllib reads, dotted headers, lines of tables and keys ----

TOML_DOCUMENTS = [
    '[set_power_limit]\ncommands = ["sudo /usr/local/bin/set_powercap.sh -value {power_limit_w} '
    '-gpu {gpu_id}"]\nerror_pattern = "(?i)error|fail|cannot|unable|not supported"\n'
    'timeout_s = 30\n',
    "# comment\n\n[reset_locked_clocks]  # trailing comment\ncommands = [\n  'a b',  # one\n"
    "  \"c \\\"d\\\" \\\\ \\t \\u00e9 \\U0001F600\",\n]\ntimeout_s = +1_000\n",
    "[a]\nx = true\ny = false\nz = [1, 'two', [3]]\nw = []\n[b-c_d]\nk = -0\n",
    "[t]\r\nk = 'v'\r\n",
]


@pytest.mark.parametrize("text", TOML_DOCUMENTS)
def test_toml_subset_reads_as_tomllib_does(text):
    parsed = zeusd.TomlReader(text).document()
    try:
        import tomllib
    except ImportError:
        pytest.skip("tomllib (Python 3.11+) is not here to compare with")
    assert parsed == tomllib.loads(text)


TOML_ERRORS = [
    "k = 1\n", "[a]\nk = 1\nk = 2\n", "[a]\n[a]\n", "[a]\nk = \"open\n", "[a]\nk = 1.5\n",
    "[a]\nk = 01\n", "[a]\nk = 1 2\n", "[a]\nk = [1 2]\n", "[a]\nk = \"\\q\"\n",
    "[a]\nk = '''x'''\n", "[a]\n\"q\" = 1\n", "[a]\nk = \"\\ud800\"\n", "[a]\nk = 1__0\n",
    "[a]\nk = 'a\x01'\n", "[a]\nk = \"x\" # \x00\n", "[a]\nk = 1_\n", "[a]\nk = tru\n",
]


@pytest.mark.parametrize("text", TOML_ERRORS)
def test_toml_subset_refuses_what_it_does_not_read(text):
    with pytest.raises(ValueError, match="line [0-9]+: "):
        zeusd.TomlReader(text).document()


DOTTED_DOCUMENTS = [
    "[group.ml]\ngpus = [0, 1]\n",
    "[group.ml]\na = 1\n[group.viz]\nb = 2\n[user.alice]\nc = true\n",
    "[group]\n[group.ml]\nx = 1\n",
    "[group.ml]\nx = 1\n[group]\ny = 2\n",
    "[a.b.c]\nx = 1\n[a.b]\ny = 2\n[a]\nz = 3\n",
    "[a-b.c_d.E9]\nk = 'v'\n",
    "[ group.ml ]  # a comment\nx = [1, 2]\n",
    "[node]\ngpu_power_budget_w = 2400\n[default]\ngpus = \"all\"\n[group.ml]\n"
    "power_limit_w = [200, 400]\n[user.alice]\npower_limit_w = true\n",
]


@pytest.mark.parametrize("text", DOTTED_DOCUMENTS)
def test_dotted_table_headers_read_as_tomllib_reads_them(text):
    tomllib = pytest.importorskip("tomllib")
    assert zeusd.TomlReader(text).document() == tomllib.loads(text)


DOTTED_ERRORS = [  # tomllib refuses each too
    "[group.ml]\n[group.ml]\n",
    "[group]\nml = 1\n[group.ml]\n",
    "[group.ml]\n[group]\nml = 2\n",
    "[a.]\n",
    "[.a]\n",
    "[a..b]\n",
    "[a.b]x = 1\n",
    "[a.b\n",
    "[group.ml]\nx = 1\nx = 2\n",
]


@pytest.mark.parametrize("text", DOTTED_ERRORS)
def test_dotted_headers_tomllib_refuses_are_refused_with_the_line(text):
    try:
        import tomllib
    except ImportError:
        tomllib = None
    if tomllib is not None:
        with pytest.raises(tomllib.TOMLDecodeError):
            tomllib.loads(text)
    with pytest.raises(ValueError, match=r"^line \d+: "):
        zeusd.TomlReader(text).document()


DOTTED_SUBSET = [  # tomllib reads these; the subset refuses them with a line
    "[group . ml]\n",
    '[group."ml"]\n',
    "[[group.ml]]\n",
    "[group]\nml.x = 1\n",
]


@pytest.mark.parametrize("text", DOTTED_SUBSET)
def test_dotted_forms_beyond_the_subset_are_refused_not_misread(text):
    with pytest.raises(ValueError, match=r"^line \d+: "):
        zeusd.TomlReader(text).document()


def test_the_reader_maps_tables_and_keys_to_their_lines():
    reader = zeusd.TomlReader("# policy\n[node]\nin_use_by_others = 'allow'\n\n[group.ml]\n"
                              "gpus = [0,\n  1]\npower_limit_w = true\n")
    reader.document()
    assert reader.lines["node"] == 2 and reader.lines["node.in_use_by_others"] == 3
    assert reader.lines["group.ml"] == 5 and reader.lines["group.ml.gpus"] == 6
    assert reader.lines["group.ml.power_limit_w"] == 8


# ---- Processes: sessions, pid reuse, hidden /proc, Slurm jobs ----

def test_session_of_names_the_leader_or_the_namespace_entry():
    def stat(pid):  # (parent, session) of a process
        with open("/proc/%d/stat" % pid) as stat_file:
            fields = stat_file.read().rpartition(")")[2].split()
        return int(fields[1]), int(fields[3])
    leader = stat(os.getpid())[1]
    if leader == 0:  # this test runs in a session begun outside its PID namespace
        leader = os.getpid()
        while stat(leader)[0] != 0:
            leader = stat(leader)[0]
    assert zeusd.session_of(os.getpid()) == [leader, zeusd.process_start(leader)]
    assert zeusd.session_of(0) == zeusd.UNSEEN_SESSION and zeusd.alive(zeusd.UNSEEN_SESSION)
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert zeusd.session_of(gone.pid) == [gone.pid, 0] and not zeusd.alive([gone.pid, 0])


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a daemon with gpu-control")
def test_a_reused_pid_is_not_the_session_that_held_the_gpu(node, start):
    """A hold left by a dead daemon, whose session leader's pid now belongs to another process
    (this one: same pid, another start time), is restored at startup, not kept."""
    state = os.path.join(node.root, "state")
    os.mkdir(state, 0o700)
    with open(os.path.join(state, "holds.json"), "w") as holds:
        json.dump({"holds": {"1": {
            "id": "0123456789abcdef", "uid": 1001, "user": None, "exp": None,
            "sessions": [[os.getpid(), 1]], "since_ms": 1, "daemon": [os.getpid(), 1],
            "saved": {"power_limit_mw": 250000, "persistence_mode": False,
                      "gpu_locked_clocks": "reset", "mem_locked_clocks": "reset"}}}}, holds)
    os.chmod(os.path.join(state, "holds.json"), 0o600)
    daemon = start("--enable", "gpu-control,gpu-read")
    wait_for(lambda: "reason=owner-gone: ok" in daemon.log(), "the restore")
    assert setters(node, "1") == [("nvmlDeviceSetPowerManagementLimit", "1", "250000"),
                                  ("nvmlDeviceSetPersistenceMode", "1", "0"),
                                  ("nvmlDeviceResetGpuLockedClocks", "1"),
                                  ("nvmlDeviceResetMemoryLockedClocks", "1")]
    assert daemon.get_json("/gpu/holds") == {}


@pytest.mark.skipif(not may_choose_pids() or not unprivileged_python(),
                    reason="needs root that may write /proc/sys/kernel/ns_last_pid, and a "
                           "Python an unprivileged user can run")
def test_a_process_that_took_the_callers_pid_is_not_the_owner(node, start, public):
    """A connection made by a process that then exits, whose pid a process of another uid in a
    session of its own gets: a change sent on it is a gone caller's, restored at once, never
    held as long as the newcomer's session lives."""
    daemon = start("--enable", "gpu-control,gpu-read", socket_name=public)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connecter = subprocess.Popen(
        [unprivileged_python(), "-c", "import socket, sys\n"
         "socket.socket(fileno=int(sys.argv[2])).connect(sys.argv[1])", public,
         str(sock.fileno())], pass_fds=[sock.fileno()], preexec_fn=as_uid(1001))
    assert connecter.wait(TIMEOUT) == 0
    connection = Connection(sock)
    assert connection.request("GET", "/time").status == 200  # the daemon has accepted it
    impostor = start_with_pid(connecter.pid, ["sleep", "30"], start_new_session=True,
                              preexec_fn=as_uid(1002))
    if impostor is None:
        pytest.skip("could not give pid %d to a new process" % connecter.pid)
    try:
        sent = time.monotonic()
        assert connection.request("POST", SET_0_PATH).status == 200
        restored_within(daemon, node, sent)
        assert "restore gpu=0 power_limit_mw=300000 persistence=1 clocks=reset " \
               "reason=session-ended: ok" in daemon.log()
        assert daemon.get_json("/gpu/holds") == {} and impostor.poll() is None
    finally:
        connection.close()
        impostor.kill()
        impostor.wait()


@pytest.mark.skipif(not MAY_UNSHARE or not shutil.which("setpriv"),
                    reason="needs root that may unshare namespaces, and setpriv")
def test_a_daemon_that_cannot_see_its_clients_sessions_is_refused(node, start):
    """/proc with hidepid (systemd's ProtectProc=invisible) hides the clients' sessions from a
    daemon without CAP_SYS_PTRACE: every hold would end at once."""
    hidden_proc = ["unshare", "--mount", "--pid", "--fork", "sh", "-c",
                   'mount -t proc -o hidepid=invisible proc /proc && exec "$@"', "sh"]
    without_ptrace = ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"]
    daemon = start("--enable", "gpu-control,gpu-read", prefix=hidden_proc + without_ptrace,
                   wait=False)
    assert daemon.wait_exit() == 1
    assert "/proc is mounted with hidepid=invisible and the daemon lacks CAP_SYS_PTRACE: it " \
           "cannot see its clients' sessions, so every GPU hold would be restored as soon as " \
           "it is made." in daemon.log()
    fix = daemon.log().split("as soon as it is made.")[1].splitlines()[0]
    assert "CAP_SYS_PTRACE" in fix and "ProtectProc=default" not in daemon.log(), fix
    for prefix, args, mode in ((hidden_proc, (), "uds"),
                               (hidden_proc + without_ptrace, ("--no-restore",), "uds"),
                               (hidden_proc + without_ptrace, (), "tcp")):
        daemon = start("--enable", "gpu-control,gpu-read", *args, prefix=prefix, mode=mode,
                       wait=False)
        wait_for(lambda: "listening on" in daemon.log() or daemon.process.poll() is not None,
                 "the daemon to listen")
        assert "listening on" in daemon.log(), daemon.log()
        os.kill(unshared_pid(daemon), signal.SIGTERM)
        assert daemon.wait_exit() == 0


@pytest.mark.parametrize("version, components", [
    ("v1", ("slurm", "uid_1000", "job_4242", "step_batch", "task_0")),
    ("v2", ("system.slice", "slurmstepd.scope", "job_4242", "step_0", "user", "task_0"))])
def test_the_job_is_the_slurm_job_of_the_holders_session_leader(node, start, version,
                                                               components):
    daemon = start("--enable", "gpu-control,gpu-read")
    cgroup = make_cgroup(version, *components)
    try:
        client = Client(daemon.socket_path, HOLD_0, prefix=in_cgroup(cgroup))
        assert client.answers == [[200, ""]]
        with open("/proc/%d/cgroup" % client.pid) as cgroups:
            assert "/job_4242/" in cgroups.read()
        assert state_file(node)["0"]["job"] == "4242"
        restored_within(daemon, node, client.end())
    finally:
        remove_cgroup(cgroup)
    receipt, = wait_receipts(node, 1)
    print("receipt: " + receipt_file_lines(node)[0])
    assert receipt["job"] == "4242"
    status, out, _ = receipts_cli(node, "--job", "4242")
    assert status == 0 and "job 4242" in out


CGROUP_CASES = [
    ("0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n", "4242"),
    ("4:memory:/slurm/uid_1000/job_4242/step_batch/task_0\n", "4242"),
    ("12:pids:/\n4:memory:/slurm/uid_1000/job_77/step_0\n0::/\n", "77"),
    ("0::/slurm/uid_5/job_31\n", "31"),
    ("0::/slurm/job_31\n", None),  # v1: slurmd's are under /slurm/uid_N/
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/job_5/x\n", None),  # delegated
    ("0::/zeusd-test/system.slice/slurmstepd.scope/job_6/step_0\n", None),  # not at the root
    ("0::/user.slice/job_12ab/step_0\n", None),
    ("0::/user.slice/job_/step_0\n", None),
    ("0::/user.slice/xjob_5/step_0\n", None),
    ("0::/user.slice/job_5x\n", None),
    ("0::/user.slice/job_-5/\n", None),
    ("0::/user.slice/job_123456789012345678901/\n", None),
    ("0::/user.slice/job_\u0661\u0662\u0663/step_0\n", None),  # Arabic-Indic digits
    ("0::/user.slice/job_\uff14\uff12/step_0\n", None),  # fullwidth digits
    ("0::/a b/job_9 /x\n", None),
    ("0::/a/job_8\x00/x\n", None),
    ("", None),
    ("garbage without colons\n", None),
]


@pytest.mark.parametrize("content, job", CGROUP_CASES)
def test_slurm_job_of_reads_digits_only(monkeypatch, content, job):
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/4242/cgroup":
            return io.BytesIO(content.encode("utf-8"))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(zeusd, "open", fake_open, raising=False)
    got = zeusd.slurm_job_of(4242)
    assert got == job
    assert got is None or re.fullmatch(r"[0-9]{1,20}", got)


@pytest.mark.parametrize("content", [
    "0::/job_1/../\n", "0::/a\n0::/job_7/x\n", "0::/a\rjob_7/x\n", "0::/a/job_7\n/x",
    "0::/job_\n7/\n", "0::/job_7\u2028/\n", "\xff\xfe0::/job_6/\n"])
def test_slurm_job_of_odd_paths_give_digits_or_nothing(monkeypatch, content):
    real_open = open
    monkeypatch.setattr(zeusd, "open", lambda path, *args, **kwargs: io.BytesIO(
        content.encode("utf-8", "surrogateescape")) if path == "/proc/4242/cgroup" else
        real_open(path, *args, **kwargs), raising=False)
    got = zeusd.slurm_job_of(4242)
    assert got is None or re.fullmatch(r"[0-9]{1,20}", got), got
    assert zeusd.SLURM_JOB.search("/system.slice/slurmstepd.scope/job_4242/step_0").group(1) \
        == "4242"


def test_slurm_job_of_a_process_gone_or_not_in_a_job():
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert zeusd.slurm_job_of(gone.pid) is None
    with open("/proc/self/cgroup") as cgroups:
        mine = cgroups.read()
    if "/job_" not in mine:
        assert zeusd.slurm_job_of(os.getpid()) is None


# ==== Device core: GPUs, CPUs, control, holds, sampling ====


# ---- Devices, GPUs: NVML loading, readings, errors, the direct ctypes field-value path ----

def test_pynvml_beside_zeusd_needs_no_install(node, start):
    """The copy-and-run install: pynvml.py (one file of nvidia-ml-py) next to zeusd.py."""
    directory = os.path.join(node.root, "opt")
    os.mkdir(directory)
    shutil.copy(ZEUSD, directory)
    shutil.copy(os.path.join(node.lib, "pynvml.py"), directory)
    daemon = start("--enable", "gpu-read", script=os.path.join(directory, "zeusd.py"),
                   env={"PYTHONPATH": ""})
    assert daemon.get_json("/discover")["gpu_ids"] == [0, 1, 2]


def test_missing_nvml_library_means_zero_gpus(node, start):
    node.update(init_fail=12)
    daemon = start()
    assert daemon.get_json("/discover")["gpu_ids"] == []
    assert "NVML is not available" in daemon.log()


def test_other_nvml_init_error_exits_1(node, start):
    node.update(init_fail=999)
    daemon = start(wait=False)
    assert daemon.wait_exit() == 1
    assert "cannot initialise NVML" in daemon.log()
    assert not os.path.exists(daemon.socket_path)


def test_gpu_power_uses_instant_power_with_fallback(daemon):
    body = daemon.get_json("/gpu/get_power")
    assert body["power_mw"] == {"0": 76000, "1": 120000, "2": 99000}
    assert abs(body["timestamp_ms"] - time.time() * 1000) < 2000
    assert daemon.get_json("/gpu/get_power?gpu_ids=1")["power_mw"] == {"1": 120000}


def test_gpu_cumulative_energy(daemon):
    assert daemon.get_json("/gpu/get_cumulative_energy?gpu_ids=2,0") == {
        "2": {"energy_mj": 5000}, "0": {"energy_mj": 123456}}
    response = daemon.get("/gpu/get_cumulative_energy")
    assert response.status == 400
    errors = response_json(response)["errors"]
    assert list(errors) == ["1"] and "cumulative energy" in errors["1"]
    assert error_of(daemon.get("/gpu/get_cumulative_energy?gpu_ids=7"), 400) == \
        "GPU index 7 does not exist."


def test_superset_gpu_reads(daemon):
    assert daemon.get_json("/gpu/get_power_limit?gpu_ids=0") == {"0": {"power_limit_mw": 300000}}
    assert daemon.get_json("/gpu/get_power_limit_constraints?gpu_ids=1") == {
        "1": {"min_power_limit_mw": 100000, "max_power_limit_mw": 700000}}
    assert daemon.get_json("/gpu/get_persistence_mode") == {
        "0": {"enabled": True}, "1": {"enabled": True}, "2": {"enabled": True}}


class NvmlValue(ctypes.Union):
    """nvmlValue_t, as nvml.h declares it."""
    _fields_ = [("dVal", ctypes.c_double), ("uiVal", ctypes.c_uint), ("ulVal", ctypes.c_ulong),
                ("ullVal", ctypes.c_ulonglong), ("sllVal", ctypes.c_longlong),
                ("siVal", ctypes.c_int), ("usVal", ctypes.c_ushort)]


class NvmlFieldValue(ctypes.Structure):
    """nvmlFieldValue_t, as nvml.h declares it."""
    _fields_ = [("fieldId", ctypes.c_uint), ("scopeId", ctypes.c_uint),
                ("timestamp", ctypes.c_longlong), ("latencyUsec", ctypes.c_longlong),
                ("valueType", ctypes.c_uint), ("nvmlReturn", ctypes.c_uint), ("value", NvmlValue)]


class NvmlLibraryError(Exception):
    def __init__(self, value):
        Exception.__init__(self, value)
        self.value = value

    def __str__(self):
        return "NVML error text %d" % self.value


def fake_nvml_library(answers):
    """A module as pynvml is one, whose nvmlDeviceGetFieldValues is a real C function pointer
    (a ctypes callback, with no argtypes, as pynvml's _nvmlGetFunctionPointer gives it) that
    fills each nvmlFieldValue_t as NVML does: answers[handle] is (the call's own nvmlReturn,
    the field's nvmlReturn, valueType, the value's union member, value). calls records
    (handle, count, fieldId) of each call through the pointer; wrapper_calls, the calls of
    the module's own (Python) nvmlDeviceGetFieldValues."""
    nvml = type(sys)("fake_nvml_with_a_library")
    calls, wrapper_calls = [], []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int32,
                      ctypes.POINTER(NvmlFieldValue))
    def get_field_values(handle, count, values):
        calls.append((handle, count, values[0].fieldId))
        returned, code, value_type, member, value = answers[handle]
        for i in range(count):
            values[i].nvmlReturn, values[i].valueType = code, value_type
            setattr(values[i].value, member, value)
        return returned
    pointer = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.cast(get_field_values, ctypes.c_void_p).value)
    pointer.argtypes = None
    handles = [ctypes.c_void_p(0x1000), ctypes.c_void_p(0x2000)]

    def field_values(handle, field_ids):
        wrapper_calls.append(handle.value)
        values = (NvmlFieldValue * len(field_ids))()
        for i, field_id in enumerate(field_ids):
            values[i].fieldId = field_id
        code = pointer(handle, ctypes.c_int32(len(field_ids)), ctypes.byref(values))
        if code:
            raise NvmlLibraryError(code)
        return values
    nvml.__dict__.update(
        NVMLError=NvmlLibraryError, NVML_FI_DEV_POWER_INSTANT=186,
        c_nvmlFieldValue_t=NvmlFieldValue,
        _nvmlGetFunctionPointer=lambda name: {"nvmlDeviceGetFieldValues": pointer}[name],
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: len(handles),
        nvmlDeviceGetHandleByIndex=handles.__getitem__, nvmlDeviceGetName=lambda h: b"Fake GPU",
        nvmlDeviceGetPciInfo=lambda h: collections.namedtuple("Pci", "busId")(b"00000000:01:00.0"),
        nvmlDeviceGetUUID=lambda h: "GPU-%x" % h.value,
        nvmlDeviceGetPowerManagementLimitConstraints=lambda h: [100000, 700000],
        nvmlDeviceGetTotalEnergyConsumption=lambda h: 1, nvmlDeviceGetFieldValues=field_values,
        nvmlDeviceGetPowerUsage=lambda h: 55000, calls=calls, wrapper_calls=wrapper_calls,
        handles=handles)
    nvml.keep = get_field_values  # the callback lives as long as the module
    return nvml


def test_nvml_field_values_through_the_librarys_own_function_pointer():
    """NvmlBackend._field_read's direct path: one call through the library's function pointer
    per read, its field value read back by offset for every value type, a failed call and a
    failed field each an error of their own, NOT_SUPPORTED a fallback to nvmlDeviceGetPowerUsage.
    (The daemon's fake pynvml has no function pointer: the daemon tests take the other path.)"""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None and hasattr(pynvml, "c_nvmlFieldValue_t"):  # as the binding lays it out
        assert [(name, getattr(pynvml.c_nvmlFieldValue_t, name).offset) for name, _ in
                pynvml.c_nvmlFieldValue_t._fields_] == [
            (name, getattr(NvmlFieldValue, name).offset) for name, _ in NvmlFieldValue._fields_]
    first, second = 0x1000, 0x2000
    answers = {first: (0, 0, 1, "uiVal", 76543), second: (0, 0, 1, "uiVal", 99000)}
    nvml = fake_nvml_library(answers)
    backend = zeusd.NvmlBackend(nvml)
    assert [gpu.name for gpu in backend.gpus] == ["Fake GPU"] * 2 and backend.instant == [True] * 2
    assert nvml.wrapper_calls == [first, second]  # the probe at startup: through the binding
    del nvml.calls[:]
    assert (backend.power_mw(0), backend.power_mw(1)) == (76543, 99000)
    assert nvml.calls == [(first, 1, 186), (second, 1, 186)]  # fieldId 186: instant power
    assert nvml.wrapper_calls == [first, second]  # reads: never through the binding's Python
    for value_type, member, value in ((0, "dVal", 81234.75), (2, "ulVal", 70001),
                                      (3, "ullVal", 70002), (4, "sllVal", 70003),
                                      (5, "siVal", 70004), (6, "usVal", 65535)):
        answers[first] = (0, 0, value_type, member, value)
        assert backend.power_mw(0) == int(value), (value_type, member)
    answers[first] = (0, 15, 1, "uiVal", 1)  # the call succeeds, the field failed: GPU is lost
    with pytest.raises(zeusd.DeviceError) as failed:
        backend.power_mw(0)
    assert failed.value.kind == "failed"
    assert str(failed.value) == ("instant power read failed on GPU 0: NVML error text 15 "
                                 "(NVML error 15)")
    answers[first] = (4, 0, 1, "uiVal", 1)  # the call itself fails: no permission
    with pytest.raises(zeusd.DeviceError) as failed:
        backend.power_mw(0)
    assert failed.value.kind == "no-permission"
    assert str(failed.value) == ("nvmlDeviceGetFieldValues failed on GPU 0: NVML error text 4 "
                                 "(NVML error 4)")
    answers[first] = (0, 0, 1, "uiVal", 76543)
    assert backend.power_mw(0) == 76543  # an error leaves the next read as it was
    answers[second] = (0, 3, 1, "uiVal", 0)  # NOT_SUPPORTED: nvmlDeviceGetPowerUsage from now on
    assert backend.power_mw(1) == 55000 and backend.instant == [True, False]
    del nvml.calls[:]
    assert backend.power_mw(1) == 55000 and nvml.calls == []


# ---- GPU command overrides: commands in place of NVML calls, their bounds and trust ----

def test_overrides_replace_control_operations(node, start, overrides):
    path = overrides(
        '[set_power_limit]\ncommands = ["@ok -value {power_limit_w} -mw={power_limit_mw} '
        '-gpu {gpu_id}", "@ok \'quoted word\' {gpu_id}"]\n'
        '[set_persistence_mode]\ncommands = ["@ok pm {enabled}"]\n'
        '[set_gpu_locked_clocks]\ncommands = ["@ok clocks {min_clock_mhz}-{max_clock_mhz}"]\n'
        '[reset_locked_clocks]\ncommands = ["@ok reset {gpu_id}"]\n')
    daemon = start("--gpu-command-overrides", path)
    assert "GPU command overrides from %s: set_power_limit" % path in daemon.log()
    assert daemon.post("/gpu/set_power_limit?gpu_ids=0,2&power_limit_mw=250500&block=true"
                       ).status == 200
    assert sorted(overrides.recorded()) == [
        ["-value", "250", "-mw=250500", "-gpu", "0"], ["-value", "250", "-mw=250500", "-gpu", "2"],
        ["quoted", "word", "0"], ["quoted", "word", "2"]]
    for query, expected in (
            ("set_persistence_mode?gpu_ids=1&enabled=true", ["pm", "1"]),
            ("set_gpu_locked_clocks?gpu_ids=1&min_clock_mhz=900&max_clock_mhz=1410",
             ["clocks", "900-1410"]),
            ("reset_locked_clocks?gpu_ids=1", ["reset", "1"])):
        assert daemon.post("/gpu/%s&block=true" % query).status == 200
        assert overrides.recorded()[-1] == expected
    assert node.calls(*POWER_SETTERS) == []
    assert daemon.post("/gpu/reset_mem_locked_clocks?gpu_ids=1&block=true").status == 200
    assert node.calls(*POWER_SETTERS) == [("nvmlDeviceResetMemoryLockedClocks", "1")]
    assert daemon.post("/gpu/set_persistence_mode?gpu_ids=0&enabled=false&block=false"
                       ).status == 200
    wait_for(lambda: overrides.recorded()[-1] == ["pm", "0"], "the non-blocking command")


@pytest.mark.parametrize("commands, reason", [
    ('["@fail", "@ok never"]', "exited with status 1; stdout: ; stderr: no such GPU"),
    ('["@print"]', "printed output matching error_pattern"),
    ('["@hang"]', "did not finish within 1 s and was killed"),
    ('["/nonexistent/tool"]', "could not be started"),
])
def test_override_failures_are_500_per_gpu(node, start, overrides, commands, reason):
    path = overrides('[set_power_limit]\ncommands = %s\nerror_pattern = "(?i)error|unable"\n'
                     'timeout_s = 1\n' % commands)
    daemon = start("--gpu-command-overrides", path)
    started = time.monotonic()
    errors = errors_of(daemon.post("/gpu/set_power_limit?gpu_ids=0,1&power_limit_mw=250000"
                                   "&block=true"), 500)
    assert sorted(errors) == ["0", "1"] and reason in errors["0"]
    assert errors["0"].startswith("command '")
    assert time.monotonic() - started < 5
    assert overrides.recorded() == []
    if commands == '["@hang"]':
        with open(overrides.pid_file) as pid_file:
            pid = int(pid_file.read())
        wait_for(lambda: not os.path.exists("/proc/%d" % pid) or
                 open("/proc/%d/stat" % pid).read().split(") ")[1].startswith("Z"),
                 "the hung command to be killed")


@pytest.mark.parametrize("text, fragment", [
    ('[set_power]\ncommands = ["x"]\n', "[set_power] is not an operation"),
    ('[set_power_limit]\ncommands = ["x"]\nretries = 2\n', "unknown key 'retries'"),
    ('[set_power_limit]\ncommands = []\n', "[set_power_limit] needs 'commands'"),
    ('[set_power_limit]\ncommands = "x"\n', "[set_power_limit] needs 'commands'"),
    ('[set_power_limit]\ncommands = ["x"]\nerror_pattern = "("\n', "not a valid regular"),
    ('[set_power_limit]\ncommands = ["x"]\ntimeout_s = 0\n', "positive integer"),
    ('[set_power_limit]\ncommands = ["x"]\ntimeout_s = true\n', "positive integer"),
    ('[reset_gpu_locked_clocks]\ncommands = ["x {power_limit_w}"]\n', "uses {power_limit_w}"),
    ('[set_power_limit]\ncommands = ["x \'open"]\n', "cannot be split"),
    ('[set_power_limit]\ncommands = ["x"\n', "line 3"),
    ('[set_power_limit]\ncommands = ["x"]\nerror_pattern = ' + "[" * 600 + "]" * 600 + "\n",
     "line 3: arrays nested deeper than 32 levels"),
])
def test_bad_override_files_exit_1_naming_the_problem(start, overrides, text, fragment):
    daemon = start("--gpu-command-overrides", overrides(text), wait=False)
    assert daemon.wait_exit() == 1
    assert fragment in daemon.log()
    assert not os.path.exists(daemon.socket_path)


def test_override_file_must_be_trusted(node, start, overrides):
    daemon = start("--gpu-command-overrides", overrides('[set_power_limit]\ncommands = ["x"]\n',
                                                        0o666), wait=False)
    assert daemon.wait_exit() == 1 and "writable by everyone" in daemon.log()
    path = overrides('[set_power_limit]\ncommands = ["@ok"]\n', 0o664)
    assert "writable by its group" in start("--gpu-command-overrides", path).log()
    if IS_ROOT:
        os.chown(path, 65534, 65534)
        os.chmod(path, 0o644)
        daemon = start("--gpu-command-overrides", path, wait=False)
        assert daemon.wait_exit() == 1 and "owned by uid 65534" in daemon.log()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the daemon as an unprivileged user")
def test_overrides_let_gpu_control_run_without_root():
    with unprivileged_checkout() as (python, root, node, script):
        record = os.path.join(root, "record.txt")
        command = write_script(root, "ok.sh", 'echo "$(id -u) $*" >> %s\n' % record)
        path = os.path.join(root, "overrides.toml")
        with open(path, "w") as override_file:
            override_file.write('[set_power_limit]\ncommands = ["%s {power_limit_w}"]\n' % command)
        open_to_everyone(root)
        os.chmod(path, 0o644)
        daemon = Daemon(node, "--enable", "gpu-control,gpu-read", "--gpu-command-overrides", path,
                        python=python, script=script, preexec_fn=as_nobody)
        try:
            assert daemon.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=300000&block=true"
                               ).status == 200
            with open(record) as record_file:
                assert record_file.read() == "65534 300\n"
        finally:
            daemon.stop()


@pytest.mark.slow
def test_override_output_and_matching_are_bounded(node, start, overrides):
    slow_pattern = "a" * 36 + "b"
    path = overrides('[set_power_limit]\ncommands = ["head -c 300000000 /dev/zero"]\n'
                     '[set_persistence_mode]\ncommands = ["@ok {enabled}", "echo %s"]\n'
                     'error_pattern = "(a|aa)+$"\n'
                     '[reset_gpu_locked_clocks]\ncommands = ["sh -c \'setsid sleep 41.5 & '
                     'sleep 30\'"]\ntimeout_s = 1\n' % slow_pattern)
    daemon = start("--gpu-command-overrides", path, "--no-restore")
    pid = daemon.process.pid
    resident = proc_status(pid, "VmRSS")
    response = daemon.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&block=true")
    assert response.status == 200
    assert proc_status(pid, "VmHWM") < resident + 8 * 1024
    matching = in_background(daemon.post, "/gpu/set_persistence_mode?gpu_ids=0&enabled=true&"
                                          "block=true")
    wait_for(lambda: overrides.recorded(), "the first command")
    longest = max(timed(daemon.get, "/time")[1] for _ in range(40))
    response, seconds = matching()
    assert "error_pattern '(a|aa)+$' could not be matched against within 1 s" in \
        errors_of(response, 500)["0"]
    assert seconds < 3 and longest < 0.2, (seconds, longest)
    response, seconds = timed(daemon.post, "/gpu/reset_gpu_locked_clocks?gpu_ids=1&block=true")
    assert "did not finish within 1 s and was killed" in errors_of(response, 500)["1"]
    assert seconds < 2.5

    def none_survive():
        for entry in os.listdir("/proc"):
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                    if b"41.5" in cmdline.read():
                        return False
            except OSError:
                pass
        return True
    wait_for(none_survive, "the escaped child to die of its SIGKILL", timeout=2)


# ---- Devices, CPUs: RAPL zones, energy, power from deltas, wraparound, glitches ----

def test_cpu_cumulative_energy(daemon):
    assert daemon.get_json("/cpu/get_cumulative_energy?cpu_ids=0,1&cpu=true&dram=true") == {
        "0": {"cpu_energy_uj": 1000000, "dram_energy_uj": 5000},
        "1": {"cpu_energy_uj": 7, "dram_energy_uj": None}}
    assert daemon.get_json("/cpu/get_cumulative_energy?cpu=false&dram=true") == {
        "0": {"cpu_energy_uj": None, "dram_energy_uj": 5000},
        "1": {"cpu_energy_uj": None, "dram_energy_uj": None}}
    assert error_of(daemon.get("/cpu/get_cumulative_energy?cpu_ids=3&cpu=true&dram=true"),
                    400) == "CPU index 3 does not exist."
    assert "'dram'" in error_of(daemon.get("/cpu/get_cumulative_energy?cpu_ids=0&cpu=true"), 400)


def test_cpu_power_from_measured_energy_deltas(node, start):
    daemon = start("--stream-format", "all-devices", "--cpu-power-poll-hz", "10")
    watts = {"intel-rapl:0": (1000000, 85.0), "intel-rapl:0/intel-rapl:0:0": (5000, 12.0),
             "intel-rapl:1": (7, 40.0)}
    def near(value, expected):
        return value is not None and abs(value - expected) < expected * 0.1

    def in_range():  # a reading taken while the ticker fell behind (a loaded machine) is low
        power = daemon.get_json("/cpu/get_power")["power_mw"]
        assert set(power) == {"0", "1"} and power["1"]["dram_mw"] is None
        return near(power["0"]["cpu_mw"], 85000) and near(power["0"]["dram_mw"], 12000)

    def next_in_range():
        event = stream.next_event(timeout=1.0)
        assert list(event["power_mw"]) == ["1"]
        return near(event["power_mw"]["1"]["cpu_mw"], 40000)
    with RaplTicker(node, watts):
        wait_for(in_range, "CPU 0's package and DRAM power within 10 % of 85 and 12 W")
        stream = daemon.stream("/cpu/stream_power?cpu_ids=1")
        wait_for(next_in_range, "a stream event with CPU 1's power within 10 % of 40 W")
        stream.close()


def test_wraparound_keeps_energy_monotonic(node, start):
    daemon = start()
    path = "/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=false"
    node.set_energy("intel-rapl:0", MAX_RANGE_UJ - 100)
    assert daemon.get_json(path)["0"]["cpu_energy_uj"] == MAX_RANGE_UJ - 100
    node.set_energy("intel-rapl:0", 50)
    assert daemon.get_json(path)["0"]["cpu_energy_uj"] == MAX_RANGE_UJ + 50
    assert daemon.get_json(path)["0"]["cpu_energy_uj"] == MAX_RANGE_UJ + 50


def test_rapl_glitch_is_an_error_not_a_jump(node, start):
    daemon = start()
    path = "/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=false"
    node.set_energy("intel-rapl:0", 5000000)
    assert daemon.get_json(path)["0"]["cpu_energy_uj"] == 5000000
    node.set_energy("intel-rapl:0", 4999999)
    assert "glitch" in errors_of(daemon.get(path), 500)["0"]
    node.set_energy("intel-rapl:0", 5000100)
    assert daemon.get_json(path)["0"]["cpu_energy_uj"] == 5000100


def test_garbage_in_energy_uj_is_an_error_not_a_stale_value(node, start):
    daemon = start("--cpu-power-poll-hz", "20")
    with RaplTicker(node, {"intel-rapl:0": (1000000, 50.0)}):
        assert daemon.get_json("/cpu/get_power?cpu_ids=0")["power_mw"]["0"]["cpu_mw"] > 0
    fd = os.open(os.path.join(node.rapl, "intel-rapl:0", "energy_uj"), os.O_WRONLY)
    os.pwrite(fd, b"garbage\n\n\n\n\n", 0)
    os.close(fd)
    wait_for(lambda: daemon.get("/cpu/get_power?cpu_ids=0").status == 500, "the read to fail")
    assert "not a number" in errors_of(daemon.get("/cpu/get_power?cpu_ids=0"), 500)["0"]
    assert daemon.get_json("/cpu/get_power?cpu_ids=1")["power_mw"]["1"]["cpu_mw"] == 0


def test_replaced_energy_file_is_reopened(node, start):
    daemon = start()
    path = "/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=false"
    node.set_energy("intel-rapl:0", 2000000)
    assert daemon.get_json(path)["0"]["cpu_energy_uj"] == 2000000
    energy_file = os.path.join(node.rapl, "intel-rapl:0", "energy_uj")
    with open(energy_file + ".new", "w") as replacement:
        replacement.write("%012d\n" % 100)
    os.replace(energy_file + ".new", energy_file)
    assert daemon.get_json(path)["0"]["cpu_energy_uj"] == 2000000
    node.set_energy("intel-rapl:0", 600)
    assert daemon.get_json(path)["0"]["cpu_energy_uj"] == 2000500
    assert "was replaced" in daemon.log()


def test_unreadable_rapl_zone_is_skipped(node, start):
    os.remove(os.path.join(node.rapl, "intel-rapl:1", "max_energy_range_uj"))
    daemon = start()
    assert daemon.get_json("/discover")["cpu_ids"] == [0]
    assert "skipping RAPL zone" in daemon.log()


def test_rapl_counter_glitch_is_refused_not_a_wrap(tmp_path):
    zone, counter = rapl_zone(tmp_path, 900)
    for raw, expected in ((899, ValueError), (901, 901), (600, ValueError), (5, 1005)):
        (zone / "energy_uj").write_text("%d\n" % raw)
        if expected is ValueError:
            with pytest.raises(ValueError, match="glitch"):
                counter.read()
        else:
            assert counter.read() == expected


def test_rapl_counter_follows_a_replaced_file(tmp_path):
    zone, counter = rapl_zone(tmp_path, 700)
    assert counter.read() == 700
    (zone / "new").write_text("3\n")
    os.replace(str(zone / "new"), str(zone / "energy_uj"))
    assert counter.read() == 700
    (zone / "energy_uj").write_text("13\n")
    assert counter.read() == 710


def test_rapl_counter_wraparound(tmp_path):
    zone, counter = rapl_zone(tmp_path, 900)
    readings = []
    for raw in (950, 10, 20, 999, 5, 5):
        (zone / "energy_uj").write_text("%d\n" % raw)
        readings.append(counter.read())
    assert readings == [950, 1010, 1020, 1999, 2005, 2005]


# ---- Bounded waits: a hung GPU ties up little and answers within its limits; slow is not hung ----

def test_a_hung_gpu_ties_up_one_thread_per_call_however_many_clients_ask(node, start):
    daemon = hang_gpu_0(node, start("--no-restore"))  # its own: the waits must be under way
    pid = daemon.process.pid
    wait_for(lambda: len(node.calls("nvmlDeviceSetPowerManagementLimit")) == 1, "the setter call")
    idle = IDLE_THREADS - 1  # --no-restore: no holds watcher
    wait_for(lambda: daemon.threads() == idle + 2, "the waiting clients' threads")
    fds = open_fds(pid)
    # Clients that ask and leave: each frees its thread and descriptor at once.
    leavers = [ask_and_leave(daemon, "/gpu/get_cumulative_energy?gpu_ids=0") for _ in range(100)]
    leavers += [ask_and_leave(daemon, "/metrics") for _ in range(50)]
    leavers += [ask_and_leave(daemon, "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&"
                                      "block=true", "POST") for _ in range(20)]
    wait_for(lambda: daemon.threads() > idle + 20, "the leavers' threads")
    for connection in leavers:
        connection.close()
    # Left: the two waiting clients' threads, one of them making the hung energy read.
    wait_for(lambda: daemon.threads() == idle + 2, "the leavers' threads to end")
    wait_for(lambda: open_fds(pid) == fds, "the leavers' descriptors to close")
    assert [call for call in node.calls("nvmlDeviceGetTotalEnergyConsumption")
            if call[1] == "0"] == [("nvmlDeviceGetTotalEnergyConsumption", "0")] * 2  # start, once
    # A healthy GPU answers at once meanwhile.
    response, seconds = timed(daemon.get, "/gpu/get_cumulative_energy?gpu_ids=2")
    assert response.status == 200 and seconds < 0.5
    # The hung GPU's queue is bounded (the 20 leavers' commands wait in it); other GPUs are not
    # affected.
    accepted = [daemon.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&block=false")
                .status for _ in range(45)]
    assert accepted == [200] * 44 + [503]
    busy = daemon.post("/gpu/set_power_limit?gpu_ids=0,1&power_limit_mw=200000&block=false")
    assert error_of(busy, 503) == "GPU 0 is busy: 64 commands are waiting"
    assert daemon.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=200000&"
                       "block=true").status == 200


@pytest.mark.slow
def test_a_hung_gpu_answers_within_the_limits(hung):
    """hung's clients have waited since the session's start: this waits for what is left of
    their bounds."""
    node, daemon = hung
    response, seconds = daemon.energy()
    assert errors_of(response, 503)["0"].startswith("GPU 0 did not answer within 5 s")
    assert 4.9 < seconds < 6.5
    # Once past the limit: 503 at once, and /metrics leaves the GPU out at once.
    response, seconds = timed(daemon.get, "/gpu/get_cumulative_energy?gpu_ids=0,2")
    assert list(errors_of(response, 503)) == ["0"] and seconds < 0.5
    samples, seconds = timed(scrape, daemon)
    assert series(samples, "zeusd_gpu_energy_joules_total", gpu=0) is None and seconds < 0.5
    assert series(samples, "zeusd_gpu_energy_joules_total", gpu=2) == 5.0
    response, seconds = daemon.setter()
    assert errors_of(response, 503)["0"].startswith(
        "GPU 0 did not finish set_power_limit within 10 s")
    assert 9.9 < seconds < 11.5
    wait_for(lambda: daemon.threads() == IDLE_THREADS, "only the hung read's thread left")
    assert "Traceback" not in daemon.log()


def test_a_slow_gpu_is_not_taken_for_a_hung_one(node, start):
    node.set_gpu(0, jitter=True)
    node.set_gpu(2, jitter=True)
    node.update(delay={"nvmlDeviceGetFieldValues": {"2": 0.12}})
    daemon = start("--enable", "gpu-read", "--stream-format", "per-device")
    stream = daemon.stream("/gpu/stream_power")
    counts = count_events(stream, 0.7)
    assert counts[2] >= 2 and counts[0] >= 1, counts
    assert daemon.get_json("/gpu/get_power?gpu_ids=2")["power_mw"]["2"] >= 99000
    assert daemon.get_json("/gpu/get_power")["power_mw"]["2"] >= 99000
    assert "did not answer" not in daemon.log()
    stream.close()


def test_a_busy_fast_sampler_reports_no_false_hangs(node, start):
    daemon = start("--enable", "gpu-read", "--gpu-power-poll-hz", "1000")
    stream = daemon.stream("/gpu/stream_power")
    connection = daemon.connect()
    for _ in range(1500):
        connection.send(b"GET /gpu/get_power HTTP/1.1\r\nHost: x\r\n\r\n")
        response = connection.response()
        assert response.status == 200, response
    assert "did not answer" not in daemon.log()
    stream.close()


# ---- GPU control: commands on every GPU, in order per GPU, errors per GPU ----

CONTROL_CASES = [
    ("set_power_limit", "power_limit_mw=250000", "nvmlDeviceSetPowerManagementLimit", ("250000",)),
    ("set_persistence_mode", "enabled=false", "nvmlDeviceSetPersistenceMode", ("0",)),
    ("set_gpu_locked_clocks", "min_clock_mhz=900&max_clock_mhz=1410",
     "nvmlDeviceSetGpuLockedClocks", ("900", "1410")),
    ("reset_gpu_locked_clocks", "", "nvmlDeviceResetGpuLockedClocks", ()),
    ("set_mem_locked_clocks", "min_clock_mhz=1593&max_clock_mhz=2619",
     "nvmlDeviceSetMemoryLockedClocks", ("1593", "2619")),
    ("reset_mem_locked_clocks", "", "nvmlDeviceResetMemoryLockedClocks", ()),
]


def test_control_endpoints_call_nvml_on_every_gpu(node, start):
    daemon = start()
    for endpoint, params, function, args in CONTROL_CASES:
        query = "gpu_ids=2,0&block=true" + ("&" + params if params else "")
        response = daemon.post("/gpu/%s?%s" % (endpoint, query))
        assert (response.status, response.body) == (200, b"")
        calls = node.calls(function)
        assert sorted(calls) == [(function, "0") + args, (function, "2") + args]
    assert daemon.post("/gpu/set_persistence_mode?gpu_ids=1&enabled=TRUE&block=true").status == 200
    assert ("nvmlDeviceSetPersistenceMode", "1", "1") in node.calls()


def test_reset_locked_clocks_resets_gpu_then_memory_clocks(node, start):
    daemon = start()
    assert daemon.post("/gpu/reset_locked_clocks?gpu_ids=1&block=true").status == 200
    assert node.calls("nvmlDeviceResetGpuLockedClocks", "nvmlDeviceResetMemoryLockedClocks") == [
        ("nvmlDeviceResetGpuLockedClocks", "1"), ("nvmlDeviceResetMemoryLockedClocks", "1")]
    node.update(fail={"nvmlDeviceResetMemoryLockedClocks": {"0": 4}})
    errors = errors_of(daemon.post("/gpu/reset_locked_clocks?gpu_ids=0,1&block=true"), 403)
    assert list(errors) == ["0"] and "Insufficient Permissions" in errors["0"]
    assert daemon.get("/gpu/reset_locked_clocks?gpu_ids=0&block=true").status == 405


def test_control_with_unknown_gpu_changes_nothing(node, start):
    daemon = start()
    response = daemon.post("/gpu/set_power_limit?gpu_ids=0,7&power_limit_mw=200000&block=true")
    assert error_of(response, 400) == "GPU index 7 does not exist."
    response = daemon.post("/gpu/reset_gpu_locked_clocks?gpu_ids=3&block=false")
    assert error_of(response, 400) == "GPU index 3 does not exist."
    assert node.calls(*POWER_SETTERS) == []


def test_commands_run_in_order_per_gpu_and_concurrently_across_gpus(node, start):
    node.update(delay={"nvmlDeviceSetGpuLockedClocks": 0.2})
    daemon = start()
    for low in (100, 200, 300):
        query = "gpu_ids=0&min_clock_mhz=%d&max_clock_mhz=1000&block=false" % low
        assert daemon.post("/gpu/set_gpu_locked_clocks?" + query).status == 200
    response = daemon.post("/gpu/set_gpu_locked_clocks?gpu_ids=1,2&min_clock_mhz=1&"
                           "max_clock_mhz=2&block=true")
    assert response.status == 200
    wait_for(lambda: len(node.calls("nvmlDeviceSetGpuLockedClocks.done")) == 5, "every command")
    gpu0 = [c for c in node.calls("nvmlDeviceSetGpuLockedClocks",
                                  "nvmlDeviceSetGpuLockedClocks.done") if c[1] == "0"]
    assert [c[0].endswith(".done") for c in gpu0] == [False, True] * 3
    assert [c[2] for c in gpu0 if len(c) > 2] == ["100", "200", "300"]
    others = [c[:2] for c in node.calls("nvmlDeviceSetGpuLockedClocks",
                                        "nvmlDeviceSetGpuLockedClocks.done") if c[1] != "0"]
    starts = [i for i, c in enumerate(others) if not c[0].endswith(".done")]
    ends = [i for i, c in enumerate(others) if c[0].endswith(".done")]
    assert max(starts) < min(ends), "GPUs 1 and 2 ran one after the other: %s" % others


def test_nonblocking_control_answers_at_once_and_logs_failures(node, start):
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": 0.3},
                fail={"nvmlDeviceSetPowerManagementLimit": {"1": 4}})
    daemon = start()
    response = daemon.post("/gpu/set_power_limit?gpu_ids=0,1&power_limit_mw=200000&block=false")
    assert (response.status, response.body) == (200, b"")
    assert node.calls("nvmlDeviceSetPowerManagementLimit.done") == []
    wait_for(lambda: len(node.calls("nvmlDeviceSetPowerManagementLimit.done")) == 2, "the commands")
    wait_for(lambda: "set_power_limit gpu=1 power_limit_mw=200000 block=false: error: "
             in daemon.log(), "the failure in the log")
    audit = sorted((line for line in daemon.log().splitlines() if "audit: " in line),
                   key=lambda line: line.split("gpu=")[1])
    assert len(audit) == 2 and "Insufficient Permissions" in audit[1]
    assert " ERROR audit: uid=%d pid=%d set_power_limit gpu=1 " % (os.getuid(), os.getpid()) \
        in audit[1]
    assert " INFO audit: uid=%d pid=%d set_power_limit gpu=0 power_limit_mw=200000 block=false: " \
        "ok" % (os.getuid(), os.getpid()) in audit[0]


# ---- State files: the state directory and holds.json: trust, size, lock-free reads ----

def test_a_state_directory_others_could_tamper_with_is_refused(node, start):
    target = os.path.join(node.root, "elsewhere")
    os.mkdir(target, 0o700)
    link = os.path.join(node.root, "link")
    os.symlink(target, link)
    shared = os.path.join(node.root, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    for path, problem in ((link, "is a symlink"), (shared, "is writable by others")):
        daemon = start("--enable", "gpu-control,gpu-read", "--state-dir", path, wait=False)
        assert daemon.wait_exit() == 1
        assert "the state directory %s %s" % (path, problem) in daemon.log()


def test_the_state_directory_defaults_to_run_zeusd_state():
    assert zeusd.build_parser().parse_args(["serve"]).state_dir == "/run/zeusd/state"
    status, out, _ = run_cli("serve", "--help")
    assert status == 0 and "[default: /run/zeusd/state]" in out


@pytest.mark.parametrize("content, mode", [
    (b'{"holds": {"0": {"id": "x"', 0o600), (b"x" * 70000, 0o600),
    (b'{"holds": {}}', 0o644), (None, 0o600)])
def test_a_state_file_that_cannot_be_trusted_is_moved_aside(node, start, content, mode):
    state = os.path.join(node.root, "state")
    os.mkdir(state, 0o700)
    path = os.path.join(state, "holds.json")
    if content is None:
        os.mkfifo(path, mode)
    else:
        with open(path, "wb") as holds:
            holds.write(content)
        os.chmod(path, mode)
    daemon = start("--enable", "gpu-control,gpu-read")
    wait_for(lambda: "moved it to %s.bad-" % path in daemon.log(), "the ERROR line")
    assert " ERROR the state file %s " % path in daemon.log()
    assert any(name.startswith("holds.json.bad-") for name in os.listdir(state))
    assert daemon.get_json("/gpu/holds") == {}


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a daemon with gpu-control")
def test_a_change_whose_record_would_pass_1_mib_is_503(node, start):
    """A state file just under 1 MiB (holds of GPUs on no daemon's list, recorded by a daemon
    that runs: this test) is read back, and a change that would add a hold to it is 503;
    the file is never moved aside."""
    holds, live = {}, this_process()
    for gpu in range(100, 104):
        holds[str(gpu)] = hold_record(live, [live], user="u" * 260000, hold_id="%016x" % gpu)
    compact = (",", ":")
    size = len(json.dumps({"holds": holds}, separators=compact))
    holds["103"]["user"] += "u" * (1024 * 1024 - 8 - size)
    path = write_state_file(node, holds, separators=compact)
    assert os.path.getsize(path) == 1024 * 1024 - 8
    with open(path, "rb") as holds_file:
        written = holds_file.read()
    daemon = start("--enable", "gpu-control,gpu-read")
    response = daemon.post(SET_0_PATH)
    assert "the node's hold record is full" in one_error(response.status, response.body,
                                                         status=503)
    assert setters(node, "0") == [] and moved_aside(node) == []
    with open(path, "rb") as holds_file:
        assert holds_file.read() == written
    assert daemon.get_json("/gpu/holds") == {}
    assert "Traceback" not in daemon.log()


def test_reads_of_holds_never_take_the_state_files_lock(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    assert daemon.post("/gpu/hold?gpu_ids=0").status == 200
    lock = os.open(state_path(node, "holds.lock"), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        response, seconds = timed(daemon.get, "/gpu/holds")
        assert response.status == 200 and seconds < 0.5, seconds
        assert list(json.loads(response.body.decode())) == ["0"]
        response, seconds = timed(daemon.get, "/metrics")
        assert response.status == 200 and seconds < 0.5, seconds
    finally:
        os.close(lock)
    assert len(json_body_of(daemon.post("/gpu/release"))) == 1


# ---- Receipts: one per ended hold, its energy, across crashes; the file's rotation and trust ----

RECEIPT_KEYS = ["hold", "gpu", "uuid", "uid", "user", "job", "since_ms", "until_ms", "energy_j",
                "changes", "saved", "reason", "restore"]


def test_a_receipt_has_every_field_and_the_counters_difference(node, start):
    """Counter read when the hold is made (kept in holds.json), energy_j/changes in
    /gpu/holds and /metrics while it lasts, the receipt's fields when the session ends."""
    daemon = start("--enable", "gpu-control,gpu-read")
    node.set_gpu(0, energy_mj=1000000)
    client = Client(daemon.socket_path, SET_0)
    assert client.answers == [[200, ""]]
    hold = state_file(node)["0"]
    assert hold["energy_mj"] == 1000000 and hold["job"] is None
    assert [change["op"] for change in hold["changes"]] == ["set_power_limit"]
    node.set_gpu(0, energy_mj=1000000 + 1234567)
    shown = daemon.get_json("/gpu/holds")["0"]
    assert shown["energy_j"] == 1234.567 and "energy_note" not in shown
    assert len(shown["changes"]) == 1
    change = shown["changes"][0]
    assert change["op"] == "set_power_limit" and change["power_limit_mw"] == 200000
    assert shown["since_ms"] <= change["t_ms"] <= time.time() * 1000
    samples = scrape(daemon)
    assert series(samples, "zeusd_gpu_hold_energy_joules", gpu=0) == 1234.567
    assert series(samples, "zeusd_gpu_hold_energy_joules", gpu=2) is None  # not held
    node.set_gpu(0, energy_mj=1000000 + 51234125)
    ended = client.end()
    restored_within(daemon, node, ended)
    receipt, = wait_receipts(node, 1)
    print("receipt: " + receipt_file_lines(node)[0])
    assert list(receipt) == RECEIPT_KEYS
    assert receipt["hold"] == hold["id"] and receipt["gpu"] == 0
    assert receipt["uuid"] == "GPU-00000000-0000-0000-0000-000000000000"
    assert (receipt["uid"], receipt["user"], receipt["job"]) == (0, "root", None)
    assert receipt["since_ms"] == hold["since_ms"]
    assert hold["since_ms"] <= receipt["until_ms"] <= time.time() * 1000
    assert receipt["energy_j"] == 51234.125
    assert receipt["changes"] == shown["changes"]
    assert receipt["saved"] == SAVED_AT_START
    assert (receipt["reason"], receipt["restore"]) == ("session-ended", "ok")
    assert stat.S_IMODE(os.stat(state_path(node, "receipts.jsonl")).st_mode) == 0o600
    assert os.stat(state_path(node, "receipts.jsonl")).st_uid == os.geteuid()
    samples = scrape(daemon)
    assert series(samples, "zeusd_gpu_hold_energy_joules", gpu=0) is None  # ended with it
    assert series(samples, "zeusd_receipts_total", reason="session-ended") == 1
    assert series(samples, "zeusd_receipt_write_errors_total") == 0


def test_two_counter_reads_per_hold_and_no_polling(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    at_startup = len(energy_reads(node, "0"))  # the probe of the counter at startup
    client = Client(daemon.socket_path, HOLD_0)
    assert client.answers == [[200, ""]]
    time.sleep(0.6)  # a sampler or a poll would read the counter meanwhile
    assert len(energy_reads(node, "0")) == at_startup + 1
    restored_within(daemon, node, client.end())
    wait_receipts(node, 1)
    assert energy_reads(node, "0")[at_startup:] == [
        ("nvmlDeviceGetTotalEnergyConsumption", "0")] * 2


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_an_adopted_hold_keeps_counting_from_its_first_reading(node, start):
    first = start("--enable", "gpu-control,gpu-read")
    node.set_gpu(2, energy_mj=7000000)
    client = Client(first.socket_path, "POST /gpu/set_power_limit?gpu_ids=2&"
                    "power_limit_mw=200000&block=true")
    assert client.answers == [[200, ""]]
    first.process.kill()
    first.process.wait()
    node.set_gpu(2, energy_mj=7000000 + 2500)
    second = start("--enable", "gpu-control,gpu-read")
    wait_for(lambda: state_file(node)["2"]["daemon"][0] == second.process.pid, "the adoption")
    assert state_file(node)["2"]["energy_mj"] == 7000000
    assert second.get_json("/gpu/holds")["2"]["energy_j"] == 2.5
    node.set_gpu(2, energy_mj=7000000 + 98765432)
    restored_within(second, node, client.end())
    receipt, = wait_receipts(node, 1)
    assert (receipt["gpu"], receipt["reason"], receipt["restore"]) == (2, "session-ended", "ok")
    assert receipt["energy_j"] == 98765.432
    assert receipt["changes"][0]["power_limit_mw"] == 200000


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_the_hold_of_an_owner_gone_while_no_daemon_ran_is_accounted(node, start):
    first = start("--enable", "gpu-control,gpu-read")
    client = Client(first.socket_path, HOLD_0)
    first.process.kill()
    first.process.wait()
    client.end()
    node.set_gpu(0, energy_mj=123456 + 4000)
    second = start("--enable", "gpu-control,gpu-read")
    receipt, = wait_receipts(node, 1)
    assert (receipt["reason"], receipt["energy_j"], receipt["changes"]) == ("owner-gone", 4.0, [])
    assert series(scrape(second), "zeusd_receipts_total", reason="owner-gone") == 1


def test_no_counter_and_a_counter_that_went_backwards_are_null_with_a_note(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, "POST /gpu/hold?gpu_ids=0,1,2")
    assert client.answers == [[200, ""]]
    node.set_gpu(0, energy_mj=100)  # a driver reload: below the reading at the start
    node.set_gpu(2, energy_mj=5000 + 10)
    holds = daemon.get_json("/gpu/holds")
    for gpu in ("0", "1"):
        assert holds[gpu]["energy_j"] is None, holds
        assert isinstance(holds[gpu].get("energy_note"), str) and holds[gpu]["energy_note"]
    assert "counter" in holds["1"]["energy_note"]
    assert "backwards" in holds["0"]["energy_note"]
    assert holds["2"]["energy_j"] == 0.01 and "energy_note" not in holds["2"]
    samples = scrape(daemon)
    assert series(samples, "zeusd_gpu_hold_energy_joules", gpu=0) is None
    assert series(samples, "zeusd_gpu_hold_energy_joules", gpu=1) is None
    assert series(samples, "zeusd_gpu_hold_energy_joules", gpu=2) == 0.01
    restored_within(daemon, node, client.end(), count=3)
    receipts = {receipt["gpu"]: receipt for receipt in wait_receipts(node, 3)}
    for gpu in (0, 1):
        assert receipts[gpu]["energy_j"] is None and receipts[gpu]["energy_note"]
    assert receipts[2]["energy_j"] == 0.01 and "energy_note" not in receipts[2]
    status, out, err = receipts_cli(node)
    assert status == 0 and err == ""
    assert "total GPU 1: 0.000 J in 1 hold (1 without an energy reading)" in out
    assert "total GPU 2: 0.010 J in 1 hold\n" in out
    assert receipts_cli(node, "--summary")[1] == "gpu_energy_j=2:0.0\n"


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_a_daemon_killed_after_the_receipt_before_the_hold_ends_leaves_one_receipt(node, start):
    """The worst moment: the receipt is on file, holds.json still has the hold (being
    restored). The test holds the state file's lock so that the daemon stops right there."""
    first = start("--enable", "gpu-control,gpu-read")
    client = Client(first.socket_path, SET_0)
    hold_id = state_file(node)["0"]["id"]
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": {"0": 0.3}})
    client.end()
    restore_begun(node, "0")
    lock = os.open(state_path(node, "holds.lock"), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wait_for(lambda: any(hold_id in line for line in receipt_file_lines(node)),
                 "the receipt on file")
        time.sleep(0.1)
        assert state_file(node)["0"]["restoring"] == "session-ended"  # not ended yet
        first.process.kill()
        first.process.wait()
    finally:
        os.close(lock)
    node.update(delay={})
    before = len(node.calls(*POWER_SETTERS))
    second = start("--enable", "gpu-control,gpu-read")
    wait_for(lambda: state_file(node) == {}, "the next daemon to end the hold")
    time.sleep(0.3)
    assert node.calls(*POWER_SETTERS)[before:] == []  # not restored a second time
    assert [receipt["hold"] for receipt in receipts_on_file(node)] == [hold_id]
    assert second.get_json("/gpu/holds") == {}
    assert "audit: restore" not in second.log()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_a_daemon_killed_during_the_restore_leaves_one_receipt_by_the_next(node, start):
    first = start("--enable", "gpu-control,gpu-read")
    client = Client(first.socket_path, SET_0)
    hold_id = state_file(node)["0"]["id"]
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": {"0": 0.5}})
    client.end()
    restore_begun(node, "0")
    first.process.kill()
    first.process.wait()
    assert receipt_file_lines(node) == []
    node.update(delay={})
    node.set_gpu(0, energy_mj=123456 + 777)
    second = start("--enable", "gpu-control,gpu-read")
    wait_for(lambda: state_file(node) == {}, "the next daemon to end the hold")
    receipt, = wait_receipts(node, 1)
    assert (receipt["hold"], receipt["reason"], receipt["restore"]) == (hold_id, "session-ended",
                                                                        "ok")
    assert receipt["energy_j"] == 0.777
    time.sleep(0.3)
    assert len(receipts_on_file(node)) == 1


def test_every_end_of_a_hold_writes_one_receipt_with_its_reason(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    assert daemon.post("/gpu/hold?gpu_ids=0").status == 200  # this test's session: root's
    assert json_body_of(daemon.post("/gpu/release?gpu_ids=0"))["0"]["reason"] == "released"
    assert daemon.post("/gpu/hold?gpu_ids=2").status == 200
    daemon.stop()
    reasons = [receipt["reason"] for receipt in receipts_on_file(node)]
    assert reasons == ["released", "daemon-stopping"]
    assert len({receipt["hold"] for receipt in receipts_on_file(node)}) == 2


def test_the_file_rotates_past_64_mib(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    path = state_path(node, "receipts.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"hold": "old", "gpu": 0}\n')
    os.ftruncate(fd, 64 << 20)  # sparse
    os.close(fd)
    assert daemon.post("/gpu/hold?gpu_ids=0").status == 200
    receipt = json_body_of(daemon.post("/gpu/release"))["0"]
    assert os.path.getsize(path + ".1") == 64 << 20
    assert receipts_on_file(node) == [receipt]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert daemon.post("/gpu/hold?gpu_ids=0").status == 200
    assert len(json_body_of(daemon.post("/gpu/release"))) == 1
    assert len(receipts_on_file(node)) == 2 and os.path.getsize(path + ".1") == 64 << 20


@pytest.mark.skipif(not IS_ROOT, reason="needs root for a file of another user")
@pytest.mark.parametrize("make", [make_symlink, make_fifo, make_foreign, make_readable])
def test_a_receipts_file_that_is_not_the_daemons_is_moved_aside(node, start, make):
    daemon = start("--enable", "gpu-control,gpu-read")
    path = state_path(node, "receipts.jsonl")
    make(path, node)
    assert daemon.post("/gpu/hold?gpu_ids=0").status == 200
    receipt = json_body_of(daemon.post("/gpu/release"))["0"]
    aside = [name for name in os.listdir(state_path(node))
             if name.startswith("receipts.jsonl.bad-")]
    assert len(aside) == 1, os.listdir(state_path(node))
    assert [line for line in error_lines(daemon) if "receipts file" in line and aside[0] in line]
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert receipts_on_file(node) == [receipt]
    if make is make_symlink:
        with open(os.path.join(node.root, "elsewhere")) as elsewhere:
            assert elsewhere.read() == "untouched\n"
    assert series(scrape(daemon), "zeusd_receipts_total", reason="released") == 1


FULL_OR_READ_ONLY = {
    # a 4 KiB tmpfs whose one page a full file takes, bound onto receipts.jsonl
    "full": 'mkdir -p "$1" && mount -t tmpfs -o size=4k,mode=0700 tmpfs "$1" && '
            'head -c 4096 /dev/zero > "$1/r" && chmod 600 "$1/r" && touch "$0" && '
            'chmod 600 "$0" && mount --bind "$1/r" "$0"',
    # receipts.jsonl bound onto itself, read-only
    "read-only": 'touch "$0" && chmod 600 "$0" && mount --bind "$0" "$0" && '
                 'mount -o remount,bind,ro "$0"'}


@pytest.mark.skipif(not MAY_UNSHARE or not shutil.which("nsenter"),
                    reason="needs root that may unshare a mount namespace, and nsenter")
@pytest.mark.parametrize("disk", sorted(FULL_OR_READ_ONLY))
def test_a_receipt_that_cannot_be_written_stops_no_restore(node, start, disk):
    """receipts.jsonl on a full disk or a read-only mount (in the daemon's own mount
    namespace): an ERROR line, counted; the restore happens, the hold ends, the GPU's worker
    goes on."""
    daemon = start("--enable", "gpu-control,gpu-read", prefix=["unshare", "--mount"])
    subprocess.check_call(["nsenter", "-t", str(daemon.process.pid), "-m", "--", "sh", "-c",
                           FULL_OR_READ_ONLY[disk], state_path(node, "receipts.jsonl"),
                           os.path.join(node.root, "small")])
    client = Client(daemon.socket_path, SET_0)
    restored_within(daemon, node, client.end())
    assert setters(node)[-4:] == RESTORE_CALLS
    wait_for(lambda: state_file(node) == {}, "the hold to end")
    assert daemon.get_json("/gpu/holds") == {}
    error = [line for line in error_lines(daemon) if "cannot write the receipt of GPU 0" in line]
    assert error and ("No space left on device" if disk == "full" else "Read-only file system") \
        in error[0], error_lines(daemon)
    samples = scrape(daemon)
    assert series(samples, "zeusd_receipt_write_errors_total") == 1
    assert series(samples, "zeusd_receipts_total", reason="session-ended") is None
    response, seconds = timed(daemon.post, SET_0_PATH)
    assert response.status == 200 and seconds < 2
    assert "Traceback" not in daemon.log()


# ---- Restores: saved settings put back: failures, overrides, bounds, other GPUs unaffected ----

def test_a_restore_that_fails_is_logged_counted_and_ends_the_hold(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, SET_0)
    node.update(fail={"nvmlDeviceSetPowerManagementLimit": {"0": 999}})
    restored_within(daemon, node, client.end())
    line = [line for line in daemon.log().splitlines() if "audit: restore gpu=0" in line][0]
    assert " ERROR audit: restore gpu=0 power_limit_mw=300000 persistence=1 clocks=reset " \
           "reason=session-ended: error: restoring GPU 0: nvmlDeviceSetPowerManagementLimit " \
           "failed on GPU 0: Unknown Error (NVML error 999)" in line
    assert setters(node)[-3:] == RESTORE_CALLS[1:]  # the other settings still put back
    assert daemon.get_json("/gpu/holds") == {}
    assert series(scrape(daemon), "zeusd_gpu_restores_total", gpu=0, reason="session-ended",
                  result="error") == 1


def test_overrides_restore_with_the_recorded_values(node, start, overrides):
    path = overrides('[set_power_limit]\ncommands = ["@ok limit {power_limit_mw} {gpu_id}"]\n'
                     '[set_persistence_mode]\ncommands = ["@ok pm {enabled} {gpu_id}"]\n'
                     '[reset_locked_clocks]\ncommands = ["@ok reset {gpu_id}"]\n')
    daemon = start("--gpu-command-overrides", path, "--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, "POST /gpu/set_power_limit?gpu_ids=2&"
                    "power_limit_mw=150000&block=true")
    assert client.answers == [[200, ""]]
    restored_within(daemon, node, client.end())
    assert overrides.recorded() == [["limit", "150000", "2"], ["limit", "300000", "2"],
                                    ["pm", "1", "2"], ["reset", "2"]]


@pytest.mark.slow
@pytest.mark.skipif(not MAY_UNSHARE or not shutil.which("nsenter"),
                    reason="needs root that may unshare a mount namespace, and nsenter")
def test_a_state_file_that_cannot_be_written_when_a_restore_ends_stops_nothing(node, start):
    """The state directory turns read-only (in the daemon's own mount namespace) while a
    restore runs: an ERROR line, the GPU's worker goes on, and the watcher ends the hold once
    the directory is writable again."""
    state = os.path.join(node.root, "state")
    daemon = start("--enable", "gpu-control,gpu-read", prefix=["unshare", "--mount"])
    in_its_mounts = ["nsenter", "-t", str(daemon.process.pid), "-m", "--"]
    client = Client(daemon.socket_path, SET_0)
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": {"0": 1.5}})
    client.end()
    restore_begun(node, "0")
    subprocess.check_call(in_its_mounts + ["sh", "-c", 'mount --bind "$0" "$0" && '
                                           'mount -o remount,bind,ro "$0"', state])
    wait_for(lambda: "reason=session-ended" in daemon.log(), "the restore's audit line")
    wait_for(lambda: any("Read-only file system" in line for line in error_lines(daemon)),
             "an ERROR line naming the failed write")
    assert series(scrape(daemon), "zeusd_state_file_write_errors_total") >= 1
    assert "0" in state_file(node)
    subprocess.check_call(in_its_mounts + ["umount", state])
    node.update(delay={})
    wait_for(lambda: "0" not in state_file(node), "the watcher to end the hold")
    assert daemon.get_json("/gpu/holds") == {}
    response, seconds = timed(daemon.post, SET_0_PATH)
    assert response.status == 200 and seconds < 5, (response, seconds)
    assert "Traceback" not in daemon.log()


def test_a_slow_gpus_restore_and_receipt_block_no_other_gpu(node, start):
    """GPU 0's restore (its energy read and power limit call) is slow; GPU 2's, ended by the
    same session's end, is on file before it, and GPU 2 takes changes meanwhile."""
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, "POST /gpu/hold?gpu_ids=0,2")
    node.update(delay={"nvmlDeviceGetTotalEnergyConsumption": {"0": 0.3},
                       "nvmlDeviceSetPowerManagementLimit": {"0": 0.6}})
    client.end()
    wait_for(lambda: [receipt["gpu"] for receipt in receipts_on_file(node)] == [2],
             "GPU 2's receipt", timeout=1.5)
    wait_for(lambda: "2" not in state_file(node), "GPU 2's hold to end")
    response, seconds = timed(daemon.post, "/gpu/set_power_limit?gpu_ids=2&"
                                           "power_limit_mw=200000&block=true")
    assert response.status == 200, response
    assert [receipt["gpu"] for receipt in receipts_on_file(node)] == [2]  # GPU 0's: not yet
    assert [receipt["gpu"] for receipt in wait_receipts(node, 2)] == [2, 0]
    daemon.post("/gpu/release")


@pytest.mark.slow
def test_sigterm_restores_before_exit_and_holds_leak_nothing(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    connection = daemon.connect()
    fds = None
    for round_number in range(151):
        if round_number == 1:  # the daemon has done it all once: what it holds open now stays
            # no RAPL guard, and this connection
            wait_for(lambda: daemon.threads() == IDLE_THREADS, "an idle daemon")
            fds = open_fds(daemon.process.pid)
        connection.send(b"POST /gpu/set_persistence_mode?gpu_ids=2&enabled=false&block=true "
                        b"HTTP/1.1\r\nHost: x\r\n\r\nPOST /gpu/release HTTP/1.1\r\n"
                        b"Host: x\r\n\r\n")
        assert (connection.response().status, connection.response().status) == (200, 200)
    connection.close()
    assert daemon.log().count("reason=released: ok") == 151
    wait_for(lambda: daemon.threads() == IDLE_THREADS - 1, "threads back to idle")
    # (fds may count a pidfd the watcher had open for a moment; a leak would add 150)
    wait_for(lambda: open_fds(daemon.process.pid) <= fds - 1, "descriptors back to idle")
    client = Client(daemon.socket_path, SET_0)
    stopped = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0 and time.monotonic() - stopped < 3
    assert "reason=daemon-stopping: ok" in daemon.log()
    assert setters(node)[-4:] == RESTORE_CALLS
    client.end()


@pytest.mark.slow
def test_sigterm_while_a_restore_hangs_waits_its_bound_and_leaves_the_hold(stopping):
    """stopping has waited for its restore since the session's start: this waits for what is
    left of the bound."""
    node, daemon = stopping
    status, seconds = daemon.exited()
    assert status == 0 and 5 < seconds < 14, (status, seconds)  # the 10 s bound, not the hang
    left = [line for line in error_lines(daemon) if "GPU 0" in line]
    assert any("next daemon" in line for line in left), daemon.log()
    assert "0" in state_file(node)
    assert "Traceback" not in daemon.log()


def test_no_restore_keeps_the_rust_daemons_behaviour(node, start):
    daemon = start("--enable", "gpu-control,gpu-read", "--no-restore",
                   state_dir=os.path.join(node.root, "state"))
    client = Client(daemon.socket_path, SET_0)
    assert client.answers == [[200, ""]]
    before = len(node.calls(*POWER_SETTERS))
    client.end()
    assert not happens_within(lambda: len(node.calls(*POWER_SETTERS)) > before, 1.2)
    assert not os.path.exists(os.path.join(node.root, "state"))
    assert daemon.get_json("/gpu/holds") == {}


# ---- Holds: who holds which GPU: conflicts, owners, sessions, changes on record ----

def test_a_hold_records_settings_first_and_is_restored_when_the_session_ends(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, SET_0,
                    "POST /gpu/set_gpu_locked_clocks?gpu_ids=0&min_clock_mhz=900&"
                    "max_clock_mhz=1400&block=true")
    assert [status for status, _ in client.answers] == [200, 200]
    calls = [call[0] for call in node.calls() if call[1] == "0"]
    set_at = calls.index("nvmlDeviceSetPowerManagementLimit")
    assert "nvmlDeviceGetPowerManagementLimit" in calls[:set_at]
    assert "nvmlDeviceGetPersistenceMode" in calls[:set_at]
    hold = state_file(node)["0"]
    assert (hold["uid"], hold["sessions"][0][0]) == (os.getuid(), client.pid)
    assert hold["saved"]["power_limit_mw"] == 300000 and hold["saved"]["persistence_mode"] is True
    holds = daemon.get_json("/gpu/holds")
    assert list(holds) == ["0"] and holds["0"]["sessions"] == [client.pid]
    assert holds["0"]["uid"] == os.getuid() and holds["0"]["saved"] == {
        "power_limit_mw": 300000, "persistence_mode": True, "gpu_locked_clocks": "reset",
        "mem_locked_clocks": "reset"}
    samples = scrape(daemon)
    assert series(samples, "zeusd_gpu_held", gpu=0) == 1
    assert series(samples, "zeusd_gpu_held", gpu=1) == 0
    before = len(setters(node))
    took = restored_within(daemon, node, client.end())
    assert setters(node)[before:] == RESTORE_CALLS
    assert "audit: restore gpu=0 power_limit_mw=300000 persistence=1 clocks=reset " \
           "reason=session-ended: ok" in daemon.log()
    assert daemon.get_json("/gpu/holds") == {} and state_file(node) == {}
    assert series(scrape(daemon), "zeusd_gpu_restores_total", gpu=0, reason="session-ended",
                  result="ok") == 1
    print("session end to restore: %.3f s" % took)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run clients as two other uids")
def test_another_uid_gets_409_and_root_always_passes(node, start, public):
    daemon = start("--enable", "gpu-control,gpu-read", socket_name=public)
    alice = Client(public, SET_0, uid=1001)
    assert alice.answers == [[200, ""]]
    hold = state_file(node)["0"]
    before = len(node.calls(*POWER_SETTERS))
    bob = Client(public, "POST /gpu/set_power_limit?gpu_ids=1,0&power_limit_mw=200000&"
                 "block=true", "POST /gpu/release?gpu_ids=0", uid=1002)
    message = ("GPU 0 is held by uid 1001 (session %d, since %s): its settings are restored "
               "when that session ends or releases it." % (
                   alice.pid, time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                            time.gmtime(hold["since_ms"] // 1000))))
    assert bob.answers == [[409, json.dumps({"error": message})]] * 2
    assert len(node.calls(*POWER_SETTERS)) == before
    assert daemon.post(SET_0_PATH).status == 200  # root: never refused, the hold stays alice's
    again = Client(public, SET_0, uid=1001)  # alice, from another session: extends the hold
    assert again.answers == [[200, ""]]
    assert state_file(node)["0"]["uid"] == 1001
    assert state_file(node)["0"]["sessions"] == [[alice.pid, hold["sessions"][0][1]],
                                                 state_file(node)["0"]["sessions"][1]]
    alice.end()  # the hold outlives one of its two sessions
    wait_for(lambda: daemon.get_json("/gpu/holds")["0"]["sessions"] == [again.pid],
             "the ended session to leave the hold")
    assert daemon.post("/gpu/release?gpu_ids=0").status == 200  # root releases it
    assert "reason=released: ok" in daemon.log() and state_file(node) == {}
    assert daemon.post("/gpu/release?gpu_ids=0,1").status == 200  # nothing held: nothing done
    assert daemon.log().count("audit: restore") == 1
    again.end()
    bob.end()


@pytest.mark.skipif(not MAY_UNSHARE or not shutil.which("nsenter"),
                    reason="needs root that may unshare namespaces, and nsenter")
def test_callers_from_outside_the_daemons_pid_namespace_hold_until_released(node, start,
                                                                             public):
    """In a container (session id 0 there), a caller's session is led by the process that
    entered the namespace; a caller the daemon cannot see at all holds until it releases."""
    daemon = start("--enable", "gpu-control,gpu-read", socket_name=public,
                   prefix=["unshare", "--pid", "--mount-proc", "--kill-child=SIGTERM"])
    daemon_pid = unshared_pid(daemon)
    inside = ["nsenter", "-t", str(daemon_pid), "-p", "--"]
    entered = Client(public, SET_0, prefix=inside)
    assert entered.answers == [[200, ""]]
    sessions = daemon.get_json("/gpu/holds")["0"]["sessions"]
    assert len(sessions) == 1 and sessions[0] > 1  # the client here, not the daemon (pid 1)
    outside = "/gpu/set_persistence_mode?gpu_ids=1&enabled=false&block=true"
    assert daemon.post(outside).status == 200  # this test's process: pid 0 to the daemon
    assert daemon.get_json("/gpu/holds")["1"]["sessions"] == [0]
    assert "WARNING GPU 1 is held by uid 0 from outside the daemon's PID namespace" \
        in daemon.log()
    alice = Client(public, "POST " + outside, uid=1001)
    assert alice.answers[0][0] == 409 and json.loads(alice.answers[0][1])["error"].startswith(
        "GPU 1 is held by uid 0 (a session outside the daemon's view, since ")
    restored_within(daemon, node, entered.end())
    assert "gpu=0 power_limit_mw=300000 persistence=1 clocks=reset reason=session-ended: ok" \
        in daemon.log()
    assert list(daemon.get_json("/gpu/holds")) == ["1"]  # the watcher's pass left it held
    assert daemon.post("/gpu/release").status == 200
    assert "gpu=1 power_limit_mw=300000 persistence=1 clocks=reset reason=released: ok" \
        in daemon.log()
    alice.end()
    os.kill(daemon_pid, signal.SIGTERM)
    assert daemon.wait_exit() == 0


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_a_uds_and_a_tcp_daemon_share_the_holds(node, key_path, start):
    local = start("--enable", "gpu-control,gpu-read")
    remote = start("--enable", "gpu-control,gpu-read", "--signing-key-path", key_path,
                   mode="tcp")
    client = Client(local.socket_path, SET_0)
    response = remote.post(SET_0_PATH, token=token(["gpu-control"]))
    assert error_of(response, 409).startswith("GPU 0 is held by uid %d" % os.getuid())
    assert list(remote.get_json("/gpu/holds", token=token(["gpu-read"]))) == ["0"]
    unowned = start("--enable", "gpu-control,gpu-read", mode="tcp")
    assert error_of(unowned.post(SET_0_PATH), 409)
    assert unowned.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=200000&"
                        "block=true").status == 200  # unowned: made, and holds nothing
    assert list(unowned.get_json("/gpu/holds")) == ["0"]
    client.end()


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="needs root to run clients as two other uids")
def test_a_gpu_being_restored_is_409_through_every_daemon_of_the_node(node, start, public):
    """Two daemons on one state directory: while the first restores GPU 1 (a slow setter),
    another uid's change of it is 409 through either daemon, and changes nothing."""
    first = start("--enable", "gpu-control,gpu-read", socket_name=public)
    second_path = os.path.join(os.path.dirname(public), "second.sock")
    second = start("--enable", "gpu-control,gpu-read", socket_name=second_path)
    alice = Client(public, "POST " + SET_1_PATH, uid=1001)
    assert alice.answers == [[200, ""]]
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": {"1": 2.5}})
    alice.end()
    restore_begun(node, "1")
    bobs = [Client(path, "POST " + SET_1_PATH, uid=1002) for path in (second_path, public)]
    for bob in bobs:
        assert one_error(*bob.answers[0], status=409).startswith("GPU 1 is being restored")
    assert "audit: restore gpu=1" not in first.log()  # the restore was under way all along
    wait_for(lambda: "restore gpu=1 power_limit_mw=300000 persistence=1 clocks=reset "
                     "reason=session-ended: ok" in first.log(), "the slow restore")
    assert setters(node, "1").count(("nvmlDeviceSetPowerManagementLimit", "1", "200000")) == 1
    assert first.get_json("/gpu/holds") == {} and second.get_json("/gpu/holds") == {}
    for bob in bobs:
        bob.end()


def test_a_gpu_whose_restore_hangs_is_409_to_other_uids(stopping):
    node, daemon = stopping
    assert daemon.answers[0] == [200, ""]
    assert one_error(*daemon.answers[1], status=409).startswith("GPU 0 is being restored")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_a_hold_of_a_gpu_this_daemon_does_not_have_is_kept(node, start):
    """A hold for GPU 7 (a GPU that fell off the bus, another node's file), left by a daemon
    that is gone: kept in the file, one ERROR line, and the daemon starts and restarts."""
    gone = [os.getpid(), 1]
    write_state_file(node, {"7": hold_record(gone, [gone])})
    for _ in range(2):
        daemon = start("--enable", "gpu-control,gpu-read")
        assert daemon.get_json("/discover")["gpu_ids"] == [0, 1, 2]
        wait_for(lambda: error_lines(daemon), "the ERROR line")
        assert daemon.post(SET_0_PATH).status == 200  # the watcher looks at the holds again
        assert daemon.post("/gpu/release").status == 200
        assert daemon.log().count("reason=released: ok") == 1
        assert len(error_lines(daemon)) == 1 and "GPU 7" in error_lines(daemon)[0]
        assert "Traceback" not in daemon.log()
        assert state_file(node)["7"]["saved"] == SAVED and state_file(node)["7"]["uid"] == 1001
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
        assert "7" in state_file(node)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run clients as three other uids")
def test_one_hold_records_at_most_64_sessions(node, start, public):
    """A 65th session of a uid is 409, and nothing it does moves the state file aside: another
    uid's hold stays whole."""
    start("--enable", "gpu-control,gpu-read", socket_name=public)
    bob = Client(public, "POST " + SET_1_PATH, uid=1002)
    assert bob.answers == [[200, ""]]
    sessions = subprocess.Popen([unprivileged_python(), "-c", MANY_SESSIONS, public, "65", SET_0],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                preexec_fn=as_uid(1001))
    try:
        answers = [json.loads(sessions.stdout.readline().decode()) for _ in range(65)]
        assert answers[:64] == [[200, ""]] * 64
        assert "64 sessions" in one_error(*answers[64], status=409)
        holds = state_file(node)
        assert len(holds["0"]["sessions"]) == 64 and holds["0"]["uid"] == 1001
        assert holds["1"]["uid"] == 1002 and holds["1"]["sessions"][0][0] == bob.pid
        assert moved_aside(node) == []
        carol = Client(public, "POST " + SET_1_PATH, uid=1003)
        assert one_error(*carol.answers[0], status=409).startswith("GPU 1 is held by uid 1002")
        carol.end()
    finally:
        sessions.stdin.close()
        sessions.wait(TIMEOUT)
    bob.end()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a daemon with gpu-control")
def test_an_admin_token_changes_and_releases_any_hold(node, key_path, start):
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-control,gpu-read",
                   mode="tcp")
    alice = token(["gpu-control", "gpu-read"])
    claims = {"sub": "slurm", "scopes": ["gpu-control", "gpu-read"],
              "exp": int(time.time()) + 3600, "admin": True}
    admin = forge({"alg": "HS256", "typ": "JWT"}, claims)
    admin_of_gpu_0 = forge({"alg": "HS256", "typ": "JWT"}, dict(claims, gpus=[0]))
    assert daemon.post(SET_0_PATH, token=alice).status == 200
    assert daemon.post("/gpu/set_power_limit?gpu_ids=2&power_limit_mw=200000&block=true",
                       token=alice).status == 200
    change = "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=250000&block=true"
    assert error_of(daemon.post(change, token=token(["gpu-control"], sub="bob")), 409)
    assert daemon.post(change, token=admin).status == 200  # the hold stays alice's
    assert setters(node)[-1] == ("nvmlDeviceSetPowerManagementLimit", "0", "250000")
    holds = daemon.get_json("/gpu/holds", token=alice)
    assert holds["0"]["user"] == "alice" and holds["0"]["saved"]["power_limit_mw"] == 300000
    assert daemon.post("/gpu/release?gpu_ids=0", token=admin).status == 200
    assert "restore gpu=0 power_limit_mw=300000 persistence=1 clocks=reset " \
           "reason=released: ok" in daemon.log()
    assert error_of(daemon.post("/gpu/release?gpu_ids=2", token=admin_of_gpu_0), 403)
    assert daemon.post("/gpu/release", token=admin_of_gpu_0).status == 200  # within its GPUs
    assert list(daemon.get_json("/gpu/holds", token=alice)) == ["2"]
    assert daemon.post("/gpu/release", token=admin).status == 200
    assert daemon.get_json("/gpu/holds", token=alice) == {}


def test_changes_are_capped_at_100_and_the_rest_counted(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    connection = daemon.connect()
    try:
        for watts in range(103):
            response = connection.request(
                "POST", "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=%d&block=true"
                % (150000 + watts * 1000))
            assert response.status == 200, response
    finally:
        connection.close()
    hold = state_file(node)["0"]
    assert len(hold["changes"]) == 100 and hold["changes_left_out"] == 3
    assert len(daemon.get_json("/gpu/holds")["0"]["changes"]) == 100
    receipt = json_body_of(daemon.post("/gpu/release"))["0"]
    assert [change["power_limit_mw"] for change in receipt["changes"]] == [
        150000 + watts * 1000 for watts in range(100)]
    assert receipt["changes_left_out"] == 3
    assert receipts_on_file(node) == [receipt]


# ---- Holds watcher: restores when sessions end or tokens expire; dead daemons' holds adopted ----

def test_a_leader_that_exits_while_its_children_live_ends_the_session(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, SET_0, mode="leave-a-child")
    assert client.answers == [[200, ""]]
    took = restored_within(daemon, node, time.monotonic())
    assert "reason=session-ended: ok" in daemon.log()
    os.killpg(client.pid, signal.SIGKILL)
    print("leader exit to restore: %.3f s" % took)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a daemon with gpu-control")
def test_token_owners_hold_until_they_release_or_their_token_expires(node, key_path, start):
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-control,gpu-read",
                   mode="tcp")
    alice, bob = token(["gpu-control", "gpu-read"]), token(["gpu-control"], sub="bob")
    assert daemon.post(SET_0_PATH, token=alice).status == 200
    response = daemon.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=250000&block=true",
                           token=bob)
    assert error_of(response, 409).startswith("GPU 0 is held by user 'alice' (since ")
    holds = daemon.get_json("/gpu/holds", token=alice)
    assert holds["0"]["user"] == "alice" and holds["0"]["uid"] is None
    assert holds["0"]["sessions"] is None
    assert daemon.post("/gpu/release", token=bob).status == 200  # bob holds nothing
    assert daemon.post("/gpu/release", token=gpu_token([0], ["gpu-control"])).status == 200
    assert list(daemon.get_json("/gpu/holds", token=alice)) == ["0"]  # still alice's
    assert error_of(daemon.post("/gpu/release?gpu_ids=0", token=bob), 409).startswith(
        "GPU 0 is held by user 'alice'")
    assert daemon.post("/gpu/release", token=alice).status == 200
    assert "reason=released: ok" in daemon.log()
    soon = token(["gpu-control"], exp=int(time.time()) + 2, sub="carol")
    assert daemon.post(SET_0_PATH, token=soon).status == 200
    wait_for(lambda: "reason=token-expired: ok" in daemon.log(), "the token's expiry",
             timeout=6)
    assert daemon.get_json("/gpu/holds", token=alice) == {}


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a daemon with gpu-control")
def test_a_token_users_hold_lasts_until_its_latest_expiry_however_far(node, key_path, start):
    """Tokens for 30 days and for a year (past what poll() takes in ms) never stop the watcher,
    and a user's hold lasts until the latest expiry of the tokens that changed the GPU: alice's
    30-day hold outlives her 2 s token, carol's 2 s token is renewed by her year's; bob's 2 s
    token alone ends his hold when it expires."""
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-control,gpu-read",
                   mode="tcp")
    now = int(time.time())
    expires = now + 2
    alice = token(["gpu-control", "gpu-read"], exp=now + 30 * 86400)
    changes = [(0, alice), (0, token(["gpu-control"], exp=expires)),
               (2, token(["gpu-control"], exp=expires, sub="carol")),
               (2, token(["gpu-control"], exp=now + 366 * 86400, sub="carol")),
               (1, token(["gpu-control"], exp=expires, sub="bob"))]
    for limit, (gpu, holder) in enumerate(changes):
        assert daemon.post("/gpu/set_power_limit?gpu_ids=%d&power_limit_mw=%d&block=true"
                           % (gpu, 200000 + limit * 10000), token=holder).status == 200
    wait_for(lambda: "restore gpu=1 power_limit_mw=300000 persistence=1 clocks=reset "
                     "reason=token-expired: ok" in daemon.log(), "bob's token to expire",
             timeout=expires - time.time() + 4)
    assert not happens_within(lambda: daemon.log().count("audit: restore") > 1, 1.0)
    holds = daemon.get_json("/gpu/holds", token=alice)
    assert sorted(holds) == ["0", "2"] and (holds["0"]["user"], holds["2"]["user"]) == (
        "alice", "carol")
    assert holds["0"]["saved"]["power_limit_mw"] == holds["2"]["saved"]["power_limit_mw"] == \
        300000
    assert "Traceback" not in daemon.log()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_a_crashed_daemons_holds_are_adopted_or_restored(node, start):
    first = start("--enable", "gpu-control,gpu-read")
    living = Client(first.socket_path, SET_0)
    gone = Client(first.socket_path, "POST /gpu/set_persistence_mode?gpu_ids=1&enabled=false&"
                  "block=true")
    first.process.kill()
    first.process.wait()
    gone.end()
    before = len(node.calls(*POWER_SETTERS))
    second = start("--enable", "gpu-control,gpu-read")
    wait_for(lambda: "reason=owner-gone: ok" in second.log(), "the dead owner's restore")
    assert [call for call in node.calls(*POWER_SETTERS)[before:] if call[1] == "1"][:2] == [
        ("nvmlDeviceSetPowerManagementLimit", "1", "300000"),
        ("nvmlDeviceSetPersistenceMode", "1", "1")]
    assert list(second.get_json("/gpu/holds")) == ["0"]
    restored_within(second, node, living.end(), count=2)
    assert second.log().count("reason=session-ended: ok") == 1


# ---- Sampling: demand-driven, one read per tick, fresh, isolated from failures and hangs ----

def test_gpu_power_is_fresh(node, start):
    daemon = start("--gpu-power-poll-hz", "20")
    assert daemon.get_json("/gpu/get_power")["power_mw"]["0"] == 76000
    node.set_gpu(0, instant_mw=81000)
    wait_for(lambda: daemon.get_json("/gpu/get_power")["power_mw"]["0"] == 81000,
             "a fresh reading", timeout=1.0)


def test_events_only_when_a_selected_value_changes(node, start):
    daemon = start("--stream-format", "all-devices", "--gpu-power-poll-hz", "50")
    first, second = daemon.stream("/gpu/stream_power?gpu_ids=0"), \
        daemon.stream("/gpu/stream_power?gpu_ids=1")
    assert first.next_event()["power_mw"] == {"0": 76000}
    assert second.next_event()["power_mw"] == {"1": 120000}
    node.set_gpu(1, power_mw=130000)
    assert second.next_event()["power_mw"] == {"1": 130000}
    assert first.next_block(timeout=0.2) is None
    node.set_gpu(0, instant_mw=70000)
    assert first.next_event()["power_mw"] == {"0": 70000}
    first.close()
    second.close()


def test_no_device_calls_while_idle_and_sampling_stops(node, start):
    daemon = start("--gpu-power-poll-hz", "100")
    after_startup = len(node.calls())
    assert not happens_within(lambda: len(node.calls()) != after_startup, 0.3)
    stream = daemon.stream("/gpu/stream_power")
    wait_for(lambda: len(node.calls(*POWER_READS)) > 30, "sampling")
    stream.close()
    wait_for(lambda: daemon.threads() == IDLE_THREADS, "the stream's thread to end")
    settled = len(node.calls())
    assert not happens_within(lambda: len(node.calls()) != settled, 0.3)
    assert (settled - after_startup) % 3 == 0, "a tick read only some GPUs"


def test_one_hardware_read_per_tick_whatever_the_subscribers(node, start):
    daemon = start("--stream-format", "all-devices", "--gpu-power-poll-hz", "20")
    streams = [daemon.stream("/gpu/stream_power") for _ in range(10)]
    for stream in streams:
        assert stream.next_event() is not None
    node.set_gpu(2, instant_mw=50000)
    for stream in streams:
        assert stream.next_event()["power_mw"]["2"] == 50000
    reads = [row[0] for row in node.timed_calls("nvmlDeviceGetFieldValues") if row[2] == "0"]
    gaps = [later - earlier for earlier, later in zip(reads[1:], reads[2:])]
    assert gaps and min(gaps) > 0.025, "GPU 0 was read more than once per 50 ms tick"
    for stream in streams:
        stream.close()


def test_stream_survives_device_failures_and_logs_once(node, start):
    daemon = start("--stream-format", "all-devices", "--gpu-power-poll-hz", "100")
    stream = daemon.stream("/gpu/stream_power")
    assert stream.next_event()["power_mw"]["0"] == 76000
    node.update(fail={"nvmlDeviceGetFieldValues": {"0": 15}})
    assert stream.next_event()["power_mw"] == {"1": 120000, "2": 99000}
    wait_for(lambda: len([c for c in node.calls("nvmlDeviceGetFieldValues") if c[1] == "0"]) > 40,
             "failed reads")
    assert list(errors_of(daemon.get("/gpu/get_power?gpu_ids=2,0"), 500)) == ["0"]
    assert "GPU is lost" in errors_of(daemon.get("/gpu/get_power"), 500)["0"]
    assert daemon.get_json("/gpu/get_power?gpu_ids=1")["power_mw"] == {"1": 120000}
    node.set_gpu(2, instant_mw=12345)
    assert stream.next_event()["power_mw"] == {"1": 120000, "2": 12345}
    assert daemon.log().count("left out of samples") == 1
    node.update(fail={})
    assert stream.next_event()["power_mw"] == {"0": 76000, "1": 120000, "2": 12345}
    wait_for(lambda: "GPU 0 reads again" in daemon.log(), "recovery")
    stream.close()


@pytest.mark.slow
def test_a_hung_gpu_does_not_stall_the_others(node, start):
    node.set_gpu(0, jitter=True)
    daemon = start("--gpu-power-poll-hz", "100", "--stream-format", "per-device")
    stream = daemon.stream("/gpu/stream_power?gpu_ids=0,2")
    assert {stream.next_event()["gpu_id"] for _ in range(2)} == {0, 2}
    node.update(delay={"nvmlDeviceGetFieldValues": {"2": 2.0}})
    wait_for(lambda: "GPU 2 did not answer within 250 ms" in daemon.log(), "the hang to be seen")
    started = time.monotonic()
    assert daemon.get_json("/gpu/get_power?gpu_ids=0")["power_mw"]["0"] > 0
    assert time.monotonic() - started < 0.1
    errors = errors_of(daemon.get("/gpu/get_power"), 503)
    assert list(errors) == ["2"] and "did not answer within 250 ms" in errors["2"]
    counts = count_events(stream, 1.0)
    assert counts[0] >= 90 and counts[2] == 0, counts
    node.update(delay={})
    wait_for(lambda: "GPU 2 reads again" in daemon.log(), "GPU 2 to recover", timeout=6)
    assert daemon.get_json("/gpu/get_power")["power_mw"]["2"] == 99000
    assert sum("GPU 2 did not answer" in line and "left out of samples" in line
               for line in daemon.log().splitlines()) == 1
    stream.close()


def test_sampler_survives_unexpected_errors(node, start):
    daemon = start("--stream-format", "all-devices", "--gpu-power-poll-hz", "100")
    stream = daemon.stream("/gpu/stream_power?gpu_ids=2")
    assert stream.next_event()["power_mw"] == {"2": 99000}
    node.update(crash=["nvmlDeviceGetFieldValues"])
    wait_for(lambda: "GPU 2: unexpected error reading it" in daemon.log(), "the error")
    errors = errors_of(daemon.get("/gpu/get_power"), 500)
    assert "RuntimeError: simulated bug" in errors["2"] and sorted(errors) == ["0", "2"]
    node.update(crash=[])
    node.set_gpu(2, instant_mw=42000)
    assert stream.next_event()["power_mw"] == {"2": 42000}
    assert sum("GPU 2: unexpected error reading it" in line and "left out of samples" in line
               for line in daemon.log().splitlines()) == 1
    assert "Traceback" not in daemon.log()
    stream.close()


def test_a_sampler_delivers_each_tick_to_any_subscriber():
    """The subscriber protocol, with a fake meter and a fake subscriber: one read per device
    per tick, each sample delivered once, from one thread, until the subscriber closes."""
    class Meter(object):
        kind, ids, reads = "GPU", (0, 1), []

        def read(self, index):
            self.reads.append(index)
            return 1000 + index

    class Subscriber(object):
        closed = False

        def __init__(self):
            self.samples, self.threads = [], set()

        def deliver(self, sample, now):
            self.samples.append(sample)
            self.threads.add(threading.current_thread().name)
            self.closed = len(self.samples) >= 5
    meter, subscriber = Meter(), Subscriber()
    sampler = zeusd.Sampler(200, meter)
    sampler.start()
    try:
        assert sampler.add_stream(subscriber)
        wait_for(lambda: subscriber.closed, "five deliveries")
        sampler.remove_stream(subscriber)
        assert all(sample.values == {0: 1000, 1: 1001} for sample in subscriber.samples)
        assert len(set(id(sample) for sample in subscriber.samples)) == 5
        assert meter.reads[:10] == [0, 1] * 5
    finally:
        sampler.stop()


# ---- Node: only the devices the enabled groups need ----

def test_starts_without_pynvml_or_rapl(node, start):
    with open(os.path.join(node.lib, "pynvml.py"), "w") as module:
        module.write("raise ImportError('No module named pynvml')\n")
    shutil.rmtree(node.rapl)
    daemon = start()
    discover = daemon.get_json("/discover")
    assert discover["gpu_ids"] == [] and discover["cpu_ids"] == []
    assert "pynvml is not installed" in daemon.log() and "no RAPL directory" in daemon.log()
    assert daemon.get_json("/gpu/get_power")["power_mw"] == {}
    assert daemon.get_json("/cpu/get_power")["power_mw"] == {}


def test_only_the_needed_devices_are_initialised(node, start):
    daemon = start("--enable", "cpu-read")
    discover = daemon.get_json("/discover")
    assert discover["gpu_ids"] == [] and discover["gpus"] == [] and discover["cpu_ids"] == [0, 1]
    assert node.calls() == []
    daemon.stop()
    daemon = start("--enable", "gpu-read")
    discover = daemon.get_json("/discover")
    assert discover["cpu_ids"] == [] and discover["cpus"] == [] and discover["gpu_ids"] == [0, 1, 2]


# ==== HTTP: replies, parameters, authentication, access, metrics, streams, API, wire ====


# ---- HTTP, replies: device errors as statuses ----

@pytest.mark.parametrize("codes, status", [
    ({"0": 4, "2": 3}, 403), ({"0": 3}, 400), ({"1": 2, "2": 999, "0": 4}, 500),
])
def test_control_errors_list_failed_gpus_with_most_severe_status(node, start, codes, status):
    node.update(fail={"nvmlDeviceSetPowerManagementLimit": codes})
    daemon = start()
    response = daemon.post("/gpu/set_power_limit?gpu_ids=0,1,2&power_limit_mw=200000&block=true")
    assert response.status == status
    errors = response_json(response)["errors"]
    assert sorted(errors) == sorted(codes)
    texts = {2: "Invalid Argument", 3: "Not Supported", 4: "Insufficient Permissions",
             999: "Unknown Error"}
    for gpu, code in codes.items():
        assert texts[code] in errors[gpu] and "GPU " + gpu in errors[gpu]
    assert len(node.calls("nvmlDeviceSetPowerManagementLimit")) == 3


def test_nvml_invalid_argument_is_400(start):
    daemon = start()
    response = daemon.post("/gpu/set_gpu_locked_clocks?gpu_ids=1&min_clock_mhz=2000&"
                           "max_clock_mhz=1000&block=true")
    assert response.status == 400
    assert "Invalid Argument" in response_json(response)["errors"]["1"]


def test_gpu_energy_nvml_error_is_mapped(node, start):
    node.update(fail={"nvmlDeviceGetTotalEnergyConsumption": {"0": 15}})
    daemon = start()
    assert daemon.get_json("/discover")["gpus"][0]["cumulative_energy_available"] is False
    node.update(fail={"nvmlDeviceGetPowerManagementLimit": {"2": 4}})
    response = daemon.get("/gpu/get_power_limit")
    assert response.status == 403 and list(response_json(response)["errors"]) == ["2"]


# ---- HTTP, query parameters: strict parsing, errors naming the parameter ----

@pytest.mark.parametrize("query, fragment", [
    ("gpu_ids=0&power_limit_mw=200000&block=true&force=1", "'force'"),
    ("gpu_ids=0&gpu_ids=1&power_limit_mw=200000&block=true", "'gpu_ids'"),
    ("gpu_ids=0&power_limit_mw=200000", "'block'"),
    ("gpu_ids=0&power_limit_mw=200000&block=yes", "'block'"),
    ("gpu_ids=0&power_limit_mw=-5&block=true", "'power_limit_mw'"),
    ("gpu_ids=0&power_limit_mw=4294967296&block=true", "'power_limit_mw'"),
    ("gpu_ids=0&power_limit_mw=2e5&block=true", "'power_limit_mw'"),
    ("gpu_ids=&power_limit_mw=200000&block=true", "'gpu_ids'"),
    ("gpu_ids=0,,1&power_limit_mw=200000&block=true", "'gpu_ids'"),
    ("gpu_ids=a&power_limit_mw=200000&block=true", "'gpu_ids'"),
    ("gpu_ids=-1&power_limit_mw=200000&block=true", "'gpu_ids'"),
    ("power_limit_mw=200000&block=true", "'gpu_ids'"),
    ("gpu_ids=0&power_limit_mw=300000%0A&block=true", "'power_limit_mw'"),
    ("gpu_ids=0%0A&power_limit_mw=300000&block=true", "'gpu_ids'"),
    ("gpu_ids=0&power_limit_mw=300000&block=true%0A", "'block'"),
])
def test_bad_query_parameters_are_400_naming_them(node, start, query, fragment):
    daemon = start()
    message = error_of(daemon.post("/gpu/set_power_limit?" + query), 400)
    assert fragment in message
    assert node.calls(*POWER_SETTERS) == []


def test_query_values_are_decoded_and_flexible(daemon):
    assert daemon.get("/gpu/get_power?gpu_ids=0%2C%201").status == 200
    body = daemon.get_json("/gpu/get_power?gpu_ids=2,%200,2")
    assert list(body["power_mw"]) == ["2", "0"]
    body = daemon.get_json("/cpu/get_cumulative_energy?cpu_ids=0&cpu=TRUE&dram=False")
    assert body["0"]["dram_energy_uj"] is None


def test_endpoints_without_parameters_ignore_the_query(daemon):
    assert daemon.get("/discover?anything=1&x").status == 200
    assert daemon.get("/time?foo").status == 200


def test_huge_numbers_are_400_not_500(daemon):
    digits = "9" * 5000
    assert "'power_limit_mw'" in error_of(daemon.post(
        "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=%s&block=true" % digits), 400)
    assert "'gpu_ids'" in error_of(daemon.get("/gpu/get_power?gpu_ids=" + digits), 400)
    data = ("POST /time HTTP/1.1\r\nContent-Length: %s\r\n\r\n" % digits).encode()
    error_of(raw_exchange(daemon, data), 400)


def test_parse_ids_and_values():
    assert zeusd.parse_ids("gpu_ids", "3, 1 ,3,0") == (3, 1, 0)
    for bad in ("", "1,", ",1", "1 2", "x", "1.0", "+1", "٣"):
        with pytest.raises(zeusd.HttpError):
            zeusd.parse_ids("gpu_ids", bad)
    assert zeusd.parse_u32("p", "4294967295") == 4294967295
    assert zeusd.parse_bool("b", "True") is True


# ---- Authentication: tokens, signing keys, scopes, the gpus and admin claims ----

def test_tokens_round_trip():
    issued = zeusd.issue_token(KEY, "bob", ["gpu-read", "cpu-read"], 2000000000)
    assert verify(issued) == zeusd.Claims("bob", ("gpu-read", "cpu-read"), 2000000000)
    assert verify(zeusd.issue_token(KEY, "bob", [], None)).exp is None
    assert verify(token(["gpu-read"], exp=None)).exp is None


@pytest.mark.parametrize("bad", [
    "", "abc", "a.b", "a.b.c.d", "....", "é.é.é", "x" * 9000,
    forge({"alg": "none"}, {"sub": "a", "scopes": []}).rsplit(".", 1)[0] + ".",
    forge({"alg": "HS512"}, {"sub": "a", "scopes": []}),
    forge({"alg": "RS256"}, {"sub": "a", "scopes": []}),
    forge({"typ": "JWT"}, {"sub": "a", "scopes": []}),
    forge({"alg": "hs256"}, {"sub": "a", "scopes": []}),
    forge({"alg": "HS256"}, {"sub": "a", "scopes": []}, key=KEY.strip()),
    forge({"alg": "HS256"}, {"sub": 5, "scopes": []}),
    forge({"alg": "HS256"}, {"scopes": []}),
    forge({"alg": "HS256"}, {"sub": "a"}),
    forge({"alg": "HS256"}, {"sub": "a", "scopes": "gpu-read"}),
    forge({"alg": "HS256"}, {"sub": "a", "scopes": ["gpu-admin"]}),
    forge({"alg": "HS256"}, {"sub": "a", "scopes": [], "exp": "2000000000"}),
    forge({"alg": "HS256"}, {"sub": "a", "scopes": [], "exp": 2000000000.5}),
    forge({"alg": "HS256"}, {"sub": "a", "scopes": [], "exp": True}),
    forge({"alg": "HS256"}, {"sub": "a", "scopes": [], "exp": -1}),
    forge({"alg": "HS256"}, ["not", "an", "object"]),
    forge(["HS256"], {"sub": "a", "scopes": []}),
])
def test_invalid_tokens_are_refused(bad):
    with pytest.raises(zeusd.HttpError) as refused:
        verify(bad)
    assert refused.value.status == 401
    assert refused.value.message.startswith("Invalid token: ")


def test_tampering_is_detected():
    good = token(["gpu-read"])
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scopes"] = ["gpu-control"]
    tampered = header + "." + b64(json.dumps(claims).encode()) + "." + signature
    for bad in (tampered, good + "x", good[:-2], header + "." + payload + "." + signature + "="):
        with pytest.raises(zeusd.HttpError):
            verify(bad)


def test_duplicate_keys_are_refused():
    for header, payload in ((b'{"alg":"none","alg":"HS256"}', b'{"sub":"a","scopes":[]}'),
                            (b'{"alg":"HS256"}', b'{"sub":"a","sub":"root","scopes":[]}'),
                            (b'{"alg":"HS256"}', b'{"sub":"a","scopes":[],"x":{"k":1,"k":2}}')):
        with pytest.raises(zeusd.HttpError) as refused:
            verify(forge_raw(header, payload))
        assert "distinct keys" in refused.value.message


def test_each_signature_has_one_spelling():
    """32 bytes take 43 base64url characters whose last carries 2 unused bits: the other three
    spellings of that character decode to the same bytes and must be refused."""
    good = token(["gpu-read"])
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(good[-1])
    variants = [good[:-1] + alphabet[(last & ~3) | low] for low in range(4) if low != last & 3]
    assert len(variants) == 3
    for variant in variants:
        assert base64.urlsafe_b64decode(variant.split(".")[2] + "=") == \
            base64.urlsafe_b64decode(good.split(".")[2] + "=")
        with pytest.raises(zeusd.HttpError):
            verify(variant)
    verify(good)


def test_deeply_nested_tokens_are_401_and_one_log_line(auth_daemon):
    nested = b64(b"[" * 1000)
    for bad in (nested + ".e30.AAAA", b64(b'{"alg":"HS256"}') + "." + nested + ".AAAA",
                forge_raw(b'{"alg":"HS256"}', b'{"sub":"a","scopes":' + b"[" * 5000 + b"]")):
        before = len(auth_daemon.log().splitlines())
        response = auth_daemon.get("/gpu/get_power", token=bad)
        assert error_of(response, 401).startswith("Invalid token: ")
        wait_for(lambda: len(auth_daemon.log().splitlines()) > before, "the request's log line")
        assert len(auth_daemon.log().splitlines()) == before + 1
    assert "Traceback" not in auth_daemon.log()
    assert auth_daemon.get("/gpu/get_power", token=token(["gpu-read"])).status == 200


def test_verification_outcomes_are_cached_failures_included(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    authenticator = zeusd.Authenticator(str(key_file))
    calls = []

    def counted(key, text):
        calls.append(text)
        return zeusd_verify(key, text)
    zeusd_verify = zeusd.verify_token
    monkeypatch.setattr(zeusd, "verify_token", counted)
    bad, good = token(["gpu-read"], key=b"another key"), token(["gpu-read"])
    for _ in range(3):
        with pytest.raises(zeusd.HttpError, match="signature mismatch"):
            authenticator.authenticate("Bearer " + bad)
        assert authenticator.authenticate("Bearer " + good).sub == "alice"
    assert len(calls) == 2


def test_non_base64_and_non_json_segments_are_refused():
    header = b64(b'{"alg": "HS256"}')
    for payload in ("!!!", b64(b"not json"), b64(b"\xff\xfe"), "a"):
        signing_input = header + "." + payload
        signature = b64(hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest())
        with pytest.raises(zeusd.HttpError):
            verify(signing_input + "." + signature)


def test_serve_key_errors_and_permission_warning(node, key_path, start):
    daemon = start("--signing-key-path", os.path.join(node.root, "nope.key"), wait=False)
    assert daemon.wait_exit() == 1
    assert "nope.key" in daemon.log()
    assert not os.path.exists(daemon.socket_path)
    os.chmod(key_path, 0o640)
    daemon = start("--signing-key-path", key_path)
    assert "readable by group or others" in daemon.log()


def test_open_endpoints_need_no_token(auth_daemon):
    assert auth_daemon.get_json("/discover")["auth_required"] is True
    assert auth_daemon.get("/time").status == 200
    assert auth_daemon.get("/time", token="garbage").status == 200


WWW_AUTHENTICATE = 'Bearer realm="zeusd"'


def test_missing_and_bad_tokens_are_401(auth_daemon):
    response = auth_daemon.get("/gpu/get_power")
    assert error_of(response, 401) == \
        "Authentication required. Provide an Authorization: Bearer <token> header."
    assert response.headers["www-authenticate"] == WWW_AUTHENTICATE
    for bad in ("garbage", token(["gpu-read"], key=b"other key"), "a.b.c",
                forge({"alg": "none"}, {"sub": "a", "scopes": ["gpu-read"]})):
        response = auth_daemon.get("/gpu/get_power", token=bad)
        assert error_of(response, 401).startswith("Invalid token: ")
        assert response.headers["www-authenticate"] == WWW_AUTHENTICATE
    response = auth_daemon.request("GET", "/gpu/get_power",
                                   {"Authorization": "Basic " + token(["gpu-read"])})
    assert error_of(response, 401).startswith("Invalid token: ")
    response = auth_daemon.request("GET", "/gpu/get_power",
                                   {"Authorization": "bEaReR " + token(["gpu-read"])})
    assert response.status == 200


def test_huge_and_unicode_headers_are_401_not_crashes(auth_daemon):
    assert auth_daemon.get("/gpu/get_power", token="x" * 60000).status == 401
    connection = auth_daemon.connect()
    connection.send(b"GET /gpu/get_power HTTP/1.1\r\n"
                    b"Authorization: Bearer \xc3\xa9.\xff.\x80\r\n\r\n")
    assert connection.response().status == 401
    connection.close()
    assert auth_daemon.get("/time").status == 200


def test_expiry_with_leeway(auth_daemon):
    now = int(time.time())
    assert auth_daemon.get("/gpu/get_power", token=token(["gpu-read"], exp=now - 30)).status == 200
    response = auth_daemon.get("/gpu/get_power", token=token(["gpu-read"], exp=now - 120))
    assert error_of(response, 401) == "Token has expired."
    assert response.headers["www-authenticate"] == WWW_AUTHENTICATE
    assert auth_daemon.get("/gpu/get_power", token=token(["gpu-read"], exp="absent")).status == 200
    assert auth_daemon.get("/gpu/get_power", token=token(["gpu-read"], exp=None)).status == 200


def test_scopes(node, auth_daemon):
    reader = token(["gpu-read"])
    response = auth_daemon.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&block=true",
                                token=reader)
    assert error_of(response, 403) == ("Token for user 'alice' lacks required scope "
                                       "'gpu-control'. Token scopes: ['gpu-read']")
    assert error_of(auth_daemon.get("/cpu/get_power", token=reader), 403).endswith(
        "lacks required scope 'cpu-read'. Token scopes: ['gpu-read']")
    assert node.calls(*POWER_SETTERS) == []
    controller = token(["gpu-control", "cpu-read"], sub="ops")
    assert auth_daemon.post("/gpu/reset_gpu_locked_clocks?gpu_ids=0&block=true",
                            token=controller).status == 200
    assert auth_daemon.get("/cpu/get_power", token=controller).status == 200
    assert error_of(auth_daemon.get("/gpu/get_power", token=controller), 403) == (
        "Token for user 'ops' lacks required scope 'gpu-read'. "
        "Token scopes: ['gpu-control', 'cpu-read']")
    stream = auth_daemon.stream("/gpu/stream_power", {"Authorization": "Bearer " + reader})
    assert stream.status == 200 and stream.next_event() is not None
    stream.close()
    wait_for(lambda: "GET /gpu/get_power 403" in auth_daemon.log() and " user=ops" in
             auth_daemon.log(), "request lines with the user")


def test_auth_matrix(key_path, start):
    """Token kinds x {enabled group, disabled group}, on an auth server and a no-auth server."""
    now = int(time.time())
    cases = [  # (kind, token, status on the enabled group's path with auth)
        ("no token", None, 401), ("garbage", "garbage", 401),
        ("wrong key", token(["gpu-read"], key=b"another key\n"), 401),
        ("expired", token(["gpu-read"], exp=now - 120), 401),
        ("expired within leeway", token(["gpu-read"], exp=now - 30), 200),
        ("wrong scope", token(["gpu-control"]), 403),
        ("other-device scope", token(["cpu-read"]), 403),
        ("right scope", token(["gpu-read"]), 200),
        ("no expiry", token(["gpu-read"], exp="absent"), 200)]
    disabled = "API group 'cpu-read' is not enabled on this server."
    with_auth = start("--signing-key-path", key_path, "--enable", "gpu-read")
    without_auth = start("--enable", "gpu-read", socket_name="plain.sock")
    for kind, value, status in cases:
        assert with_auth.get("/gpu/get_power", token=value).status == status, kind
        assert error_of(with_auth.get("/cpu/get_power", token=value), 404) == disabled, kind
        assert without_auth.get("/gpu/get_power", token=value).status == 200, kind
        assert error_of(without_auth.get("/cpu/get_power", token=value), 404) == disabled, kind


@pytest.mark.parametrize("gpus", ["0", [0, "1"], [-1], [True], [2 ** 32], {"0": 1}])
def test_bad_gpus_claims_are_refused(gpus):
    with pytest.raises(zeusd.HttpError) as refused:
        verify(forge({"alg": "HS256"}, {"sub": "a", "scopes": [], "gpus": gpus}))
    assert "'gpus'" in refused.value.message


def test_gpus_claim_limits_a_token_to_its_gpus(node, auth_daemon):
    limited = gpu_token([2, 0])
    assert auth_daemon.get_json("/auth/whoami", token=limited)["gpus"] == [0, 2]
    assert sorted(auth_daemon.get_json("/gpu/get_power", token=limited)["power_mw"]) == ["0", "2"]
    assert sorted(auth_daemon.get_json("/gpu/get_cumulative_energy?gpu_ids=2",
                                       token=limited)) == ["2"]
    assert sorted(auth_daemon.get_json("/gpu/get_power_limit", token=limited)) == ["0", "2"]
    response = auth_daemon.request("POST", "/gpu/set_power_limit?gpu_ids=0,1,3&power_limit_mw="
                                   "200000&block=true", token=limited)
    assert error_of(response, 403) == ("Token for user 'job42' is not allowed GPU(s) [1, 3]. "
                                       "Token GPUs: [0, 2]")
    assert node.calls(*POWER_SETTERS) == []
    assert error_of(auth_daemon.get("/gpu/get_power?gpu_ids=1", token=limited), 403)
    response = auth_daemon.request("POST", "/gpu/set_power_limit?gpu_ids=2&power_limit_mw=200000"
                                   "&block=true", token=limited)
    assert response.status == 200
    assert node.calls(*POWER_SETTERS) == [("nvmlDeviceSetPowerManagementLimit", "2", "200000")]
    stream = auth_daemon.stream("/gpu/stream_power",
                                headers={"Authorization": "Bearer " + limited})
    assert sorted(stream.next_event()["gpu_id"] for _ in range(2)) == [0, 2]
    assert stream.next_block(timeout=0.2) is None
    stream.close()
    assert auth_daemon.get("/cpu/get_power", token=gpu_token([0], ["cpu-read"])).status == 200
    assert "gpus" not in auth_daemon.get_json("/auth/whoami", token=token(["gpu-read"]))


def test_whoami(auth_daemon):
    exp = int(time.time()) + 600
    assert auth_daemon.get_json("/auth/whoami", token=token(["cpu-read"], exp=exp)) == {
        "sub": "alice", "scopes": ["cpu-read"], "exp": exp}
    assert auth_daemon.get_json("/auth/whoami", token=token([], exp="absent")) == {
        "sub": "alice", "scopes": []}
    assert auth_daemon.get("/auth/whoami").status == 401


def test_tokens_from_the_cli_work_against_the_daemon(key_path, auth_daemon):
    status, out, _ = issue_cli(key_path, "--user", "carol", "--scope", "gpu-read",
                               "--expires", "7d")
    assert auth_daemon.get_json("/auth/whoami", token=out.strip())["sub"] == "carol"


def test_pyjwt_interoperability(key_path, auth_daemon):
    jwt = pytest.importorskip("jwt")
    status, out, _ = issue_cli(key_path, "--user", "dave", "--scope", "gpu-read,cpu-read",
                               "--expires", "2h")
    decoded = jwt.decode(out.strip(), KEY, algorithms=["HS256"])
    assert set(decoded) == {"sub", "scopes", "exp"}
    assert (decoded["sub"], decoded["scopes"]) == ("dave", ["gpu-read", "cpu-read"])
    assert jwt.get_unverified_header(out.strip())["alg"] == "HS256"
    status, out, _ = issue_cli(key_path, "--user", "erin", "--expires", "never")
    assert jwt.decode(out.strip(), KEY, algorithms=["HS256"]) == {"sub": "erin", "scopes": []}
    foreign = jwt.encode({"sub": "frank", "scopes": ["gpu-read"], "exp": int(time.time()) + 60},
                         KEY, algorithm="HS256")
    foreign = foreign.decode() if isinstance(foreign, bytes) else foreign
    assert auth_daemon.get_json("/auth/whoami", token=foreign)["sub"] == "frank"
    assert auth_daemon.get("/gpu/get_power", token=foreign).status == 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = jwt.encode({"sub": "frank", "scopes": ["gpu-read"]}, KEY, algorithm="HS512")
    other = other.decode() if isinstance(other, bytes) else other
    assert auth_daemon.get("/gpu/get_power", token=other).status == 401


def test_a_flood_of_distinct_tokens_does_not_grow_the_daemon(key_path, start):
    """Tokens over the 8 KiB limit are refused without being kept, and the verification cache
    is bounded in bytes: thousands of distinct 60 KB and 8 KB tokens leave memory as it was."""
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-read")
    connection = daemon.connect()

    def ask(tokens):
        """Send the tokens pipelined, 50 at a time, on one connection; the statuses."""
        statuses = []
        for first in range(0, len(tokens), 50):
            batch = tokens[first:first + 50]
            connection.send(b"".join(b"GET /auth/whoami HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: Bearer %s\r\n\r\n" % value
                                     for value in batch))
            statuses.extend(connection.response().status for _ in batch)
        return statuses

    assert set(ask([b"warm.up.%06d" % n + b"a" * 8000 for n in range(100)])) == {401}
    pid = daemon.process.pid
    rss, hwm = proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM")
    assert set(ask([b"%06d." % n + b"a" * 60000 + b".b" for n in range(1000)])) == {401}
    assert set(ask([b"%06d." % n + b"a" * 8000 + b".b" for n in range(4000)])) == {401}
    grown = (proc_status(pid, "VmRSS") - rss, proc_status(pid, "VmHWM") - hwm)
    assert max(grown) < 20 * 1024, "grew by %d kB (VmRSS) and %d kB (VmHWM)" % grown
    assert connection.request("GET", "/auth/whoami",
                              {"Authorization": "Bearer " + token([])}).status == 200
    connection.close()


# ---- Access policy: the policy file: errors naming file, line and key; trust; tables; reloads ----

BAD_POLICIES = [  # (text, line, what the error says after "line N: ")
    ("[node]\ngpu_power_budget_w = 2400\n[nodes]\n", 3,
     "[nodes] unknown table (expected [node], [default], [group.NAME] or [user.NAME])"),
    ("[default]\ngpus = 'all'\npower_w = 300\n", 3, "[default] power_w: unknown key"),
    ("[node]\nbudget = 1\n", 2, "[node] budget: unknown key"),
    ("[default]\npersistence_mode = 'yes'\n", 2,
     "[default] persistence_mode: expected true or false"),
    ("[default]\ngpus = 1\n", 2, "[default] gpus: expected \"all\" or a list of GPU indices"),
    ("[default]\ngpus = 'ALL'\n", 2, "[default] gpus: expected \"all\""),
    ("[default]\ngpus = [0, -1]\n", 2, "[default] gpus: expected \"all\""),
    ("[default]\npower_limit_w = [200]\n", 2,
     "[default] power_limit_w: expected an inclusive range [low, high]"),
    ("[default]\npower_limit_w = '200-400'\n", 2,
     "[default] power_limit_w: expected an inclusive range [low, high]"),
    ("[node]\ngpu_power_budget_w = true\n", 2,
     "[node] gpu_power_budget_w: expected a positive whole number of watts"),
    ("[node]\ngpu_power_budget_w = 0\n", 2,
     "[node] gpu_power_budget_w: expected a positive whole number of watts"),
    ("[node]\nin_use_by_others = 'maybe'\n", 2,
     "[node] in_use_by_others: expected \"refuse\" or \"allow\""),
    ("# ml\n\n[group.ml]\ngpus = [0, 1]\npower_limit_w = [400, 200]\n", 5,
     "[group.ml] power_limit_w: the range is backwards: 400 is above 200"),
    ("[user.alice]\ngpu_locked_clocks_mhz = [1980, 900]\n", 2,
     "[user.alice] gpu_locked_clocks_mhz: the range is backwards: 1980 is above 900"),
    ("[default]\ngpus = [0, 3]\n", 2, "[default] gpus: GPU 3 does not exist (this node has 3)"),
    ("[group]\nml = 1\n", 2, "[group] ml: expected a table [group.NAME]"),
    ("[default]\n\n[group.ml.x]\n", 3, "[group.ml] x: unknown key"),
    ("[default]\ngpus = [0\n", 3, "expected ',' or ']' in an array"),
    ("[default]\npower_limit_w = " + "[" * 40 + "]" * 40 + "\n", 2,
     "arrays nested deeper than 32 levels"),
]


STARTUP_CASES = (0, 1, 3, 12, 14)  # an unknown table, an unknown key, a wrong type, a range


def test_bad_policy_files_exit_1_naming_the_file_line_and_key(tmp_path):
    root = str(tmp_path)
    paths = [write_policy(root, text, "bad%d.toml" % i) for i, (text, _, _) in
             enumerate(BAD_POLICIES)]
    expected = ["--policy %s: line %d: %s" % (path, line, fragment)
                for path, (_, line, fragment) in zip(paths, BAD_POLICIES)]
    outcomes = exits_of(root, [paths[i] for i in STARTUP_CASES])
    for i, (status, log_text) in zip(STARTUP_CASES, outcomes):
        assert status == 1 and expected[i] in log_text, (BAD_POLICIES[i], log_text)
    wrong = []
    for path, (text, _, fragment), message in zip(paths, BAD_POLICIES, expected):
        with pytest.raises(zeusd.StartupError) as refused:  # what serve loads, with 3 GPUs
            zeusd.load_policy(path, len(GPUS))
        if message not in str(refused.value):
            wrong.append((text, str(refused.value)))
        if "does not exist" not in fragment and message not in lint_error(path):
            wrong.append((text, "lint", lint_error(path)))
    assert wrong == []


DEEP_HEADERS = [("[group.ml.x.y]\n", "[group.ml] x: unknown key"),
                ("[user.alice.x.y.z]\n", "[user.alice] x: unknown key"),
                ("[group" + ".a" * 30000 + "]\n", "tables nested deeper than 32 levels")]


def test_headers_nested_deeper_than_a_table_name_the_line_of_the_header(tmp_path):
    root = str(tmp_path)
    paths = [write_policy(root, text, "deep%d.toml" % i) for i, (text, _) in
             enumerate(DEEP_HEADERS)]
    [(status, log_text)] = exits_of(root, paths[:1])
    assert status == 1 and "Traceback" not in log_text
    assert "--policy %s: line 1: %s" % (paths[0], DEEP_HEADERS[0][1]) in log_text, log_text
    for path, (_, fragment) in zip(paths[1:], DEEP_HEADERS[1:]):
        with pytest.raises(zeusd.StartupError) as refused:
            zeusd.load_policy(path, len(GPUS))
        assert "--policy %s: line 1: %s" % (path, fragment) in str(refused.value)


TRUST_CASES = ["symlink-to-world-writable", "fifo", "device", "huge", "missing",
               "owned-by-another-user", "not-utf8"]


def test_policy_files_the_daemon_cannot_trust_are_refused_at_once(tmp_path):
    cases = []
    for kind in TRUST_CASES if IS_ROOT else [kind for kind in TRUST_CASES
                                             if kind != "owned-by-another-user"]:  # chown
        directory = os.path.join(str(tmp_path), kind)
        os.mkdir(directory)
        cases.append((kind,) + trust_case(directory, kind))
    started = time.monotonic()
    through_daemons = cases[:4]  # a symlink to a world-writable file, a FIFO, a device, huge
    for (kind, path, fragment), (status, log_text) in zip(
            through_daemons, exits_of(str(tmp_path), [path for _, path, _ in through_daemons])):
        assert status == 1, (kind, log_text)
        assert "--policy %s" % path in log_text and fragment in log_text, (kind, log_text)
    assert time.monotonic() - started < 5
    for kind, path, fragment in cases:
        with pytest.raises(zeusd.StartupError) as refused:
            zeusd.load_policy(path, len(GPUS))
        assert "--policy %s" % path in str(refused.value), kind
        assert fragment in str(refused.value) and fragment in lint_error(path), kind


def test_a_group_writable_policy_is_warned_about_and_a_group_the_node_lacks_is_info(node,
                                                                                   start):
    path = write_policy(node.root, """
        [group.zptnosuchgroup]
        gpus = "all"
        """)
    os.chmod(path, 0o664)
    daemon = start("--policy", path, "--no-restore")
    log_text = daemon.log()
    assert "WARNING --policy %s is writable by its group (mode 664)" % path in log_text
    assert "INFO policy %s: [group.zptnosuchgroup] names a group this node does not have" \
           % path in log_text
    assert "ERROR" not in log_text


BUDGET_2400 = {"gpu_power_budget_w": 2400, "power_limits_total_w": 900.0}


def test_each_caller_gets_its_table_as_get_gpu_policy_shows(policed, people):
    alice, bob, carol, ghost, stranger = (people[name] for name in (
        "alice", "bob", "carol", "ghost", "stranger"))
    own = [100000, 700000]
    views = {name: view_of(ask_as(policed.socket_path, people[name], "GET /gpu/policy")[0])
             for name in ("alice", "bob", "carol", "ghost", "stranger")}
    # a user table beats the groups (alice is in zptml too)
    assert views["alice"] == {
        "caller": {"uid": alice.uid, "user": "zptalice", "groups": ["zptalice", "zptml"]},
        "table": "user.zptalice", "gpus": {str(i): allowed(power=own) for i in range(3)},
        "budget": BUDGET_2400}
    # groups combined: primary (zptml) and supplementary (zptviz); the widest range per GPU
    assert views["bob"] == {
        "caller": {"uid": bob.uid, "user": "zptbob", "groups": ["zptml", "zptviz"]},
        "table": BOB_TABLE, "gpus": {
            "0": allowed(power=[200000, 400000], gpu_clocks=[900, 1980]),
            "1": allowed(power=[200000, 500000], gpu_clocks=[900, 1980], mem_clocks=[800, 1600],
                         persistence=True),
            "2": allowed(power=[250000, 500000], mem_clocks=[800, 1600], persistence=True)},
        "budget": BUDGET_2400}
    # no table names carol or her groups: [default]
    assert views["carol"] == {
        "caller": {"uid": carol.uid, "user": "zptcarol", "groups": ["zptcarol"]},
        "table": "default", "gpus": {"0": nothing_allowed(), "1": nothing_allowed(),
                                     "2": allowed(power=[150000, 250000])},
        "budget": BUDGET_2400}
    # no passwd entry: no user table, groups from the gid only
    assert views["ghost"] == {
        "caller": {"uid": ghost.uid, "user": None, "groups": ["zptghost"]},
        "table": "group.zptghost", "gpus": {"0": nothing_allowed(), "1": allowed(power=own),
                                            "2": nothing_allowed()},
        "budget": BUDGET_2400}
    assert views["stranger"]["caller"] == {"uid": stranger.uid, "user": None, "groups": []}
    assert views["stranger"]["table"] == "default"
    assert views["stranger"]["gpus"] == views["carol"]["gpus"]
    root = policed.get_json("/gpu/policy?gpu_ids=0")
    assert root["table"] == "exempt" and root["gpus"] == {"0": {
        "power_limit_mw": own, "gpu_locked_clocks_mhz": True, "mem_locked_clocks_mhz": True,
        "persistence_mode": True, "in_use_by": []}}
    assert list(policed.get_json("/gpu/policy?gpu_ids=2")["gpus"]) == ["2"]


def test_a_policy_range_outside_the_gpus_own_range_shows_that_nothing_may_be_set(node, start):
    path = write_policy(node.root, """
        [default]
        gpus = [0]
        power_limit_w = [750, 900]
        [user.low]
        gpus = [0]
        power_limit_w = [50, 150]
        """)  # the GPUs take 100 to 700 W
    daemon = start("--policy", path, "--no-restore", "--signing-key-path",
                   write_key(node.root), mode="tcp")
    low = token(CONTROL, sub="low")
    assert daemon.get_json("/gpu/get_power_limit_constraints?gpu_ids=0", token=low) == {
        "0": {"min_power_limit_mw": 100000, "max_power_limit_mw": 150000}}
    assert daemon.get_json("/gpu/policy?gpu_ids=0", token=low)["gpus"]["0"][
        "power_limit_mw"] == [100000, 150000]
    other = token(CONTROL, sub="other")
    for watts in (100, 700, 750, 900):
        assert post(daemon, set_limit(0, watts), other).status in (400, 403), watts
    assert node.calls(*POWER_SETTERS) == []
    assert daemon.get_json("/gpu/policy?gpu_ids=0", token=other)["gpus"]["0"][
        "power_limit_mw"] is None  # no value it may set: not the GPU's whole range


def test_sighup_applies_a_good_policy_and_keeps_the_policy_in_force_on_a_bad_one(node, start):
    """A TCP caller without auth (nobody known) gets [default]."""
    path = write_policy(node.root, """
        [default]
        gpus = "all"
        power_limit_w = [150, 250]
        """)
    daemon = start("--policy", path, "--no-restore", mode="tcp")

    def asked(watts):
        return post(daemon, set_limit(0, watts))
    refusal = "an unauthenticated TCP caller may set power limits of 150 to %d W on GPU 0 " \
              "(policy: default); asked %d W."
    assert error_of(asked(300), 403) == refusal % (250, 300)
    write_policy(node.root, """
        [default]
        gpus = "all"
        power_limit_w = [150, 350]
        """)
    sighup_and_wait(daemon, "SIGHUP: reloaded the policy from %s" % path)
    assert asked(300).status == 200
    bad_files = [("# bad\n[default]\ngpus = 'all'\npower_limit_w = [400, 200]\n",
                  "line 4: [default] power_limit_w: the range is backwards: 400 is above 200"),
                 ("[default]\ngpus = [0, 7]\n", "line 2: [default] gpus: GPU 7 does not exist"),
                 ("[default\n", "line 1: expected ']'"),
                 ("fifo", "not a regular file"),
                 ("world-writable", "is writable by everyone"),
                 ("missing", "No such file or directory")]
    for content, fragment in bad_files:
        if os.path.lexists(path):
            os.unlink(path)
        if content == "fifo":
            os.mkfifo(path)
        elif content != "missing":
            write_policy(node.root, content if content != "world-writable" else
                         "[default]\ngpus = 'all'\npower_limit_w = true\n")
            if content == "world-writable":
                os.chmod(path, 0o666)
        sighup_and_wait(daemon, "SIGHUP: keeping the current policy")
        line = [line for line in daemon.log().splitlines()
                if "keeping the current policy" in line][-1]
        assert " ERROR " in line and "--policy %s" % path in line and fragment in line, line
        assert asked(300).status == 200, content
        assert error_of(asked(400), 403) == refusal % (350, 400), content
    if os.path.lexists(path):
        os.unlink(path)
    write_policy(node.root, "[default]\ngpus = [1]\n")
    sighup_and_wait(daemon, "SIGHUP: reloaded the policy from %s" % path)
    assert error_of(asked(200), 403) == "an unauthenticated TCP caller may not change GPU 0 " \
                                        "(policy: default allows GPUs 1)."


RACE_POLICIES = {
    "P1": """
        [node]
        gpu_power_budget_w = 900
        [default]
        gpus = "all"
        power_limit_w = [100, 400]
        """,
    "P2": """
        [default]
        gpus = "all"
        power_limit_w = [100, 300]
        """,
}


def test_a_reload_racing_requests_gives_each_request_one_policy_whole(node, start, public,
                                                                      people):
    """Under P1 a raise to 350 W is 409 (the budget); under P2, 403 (the range). An answer
    of neither (200: P1's range with P2's missing budget) is a request that saw two policies."""
    alice = people["alice"]
    node.update(delay={"nvmlDeviceGetComputeRunningProcesses": 0.01,
                        "nvmlDeviceGetGraphicsRunningProcesses": 0.01})
    path = write_policy(node.root, RACE_POLICIES["P1"])
    daemon = start("--policy", path, "--no-restore", socket_name=public)
    expected = {(409, budget_message(900, [0], 350, 950)),
                (403, "%s may set power limits of 100 to 300 W on GPU 0 (policy: default); asked "
                      "350 W." % who(alice))}
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for name in ("P2", "P1"):
                write_policy(node.root, RACE_POLICIES[name])
                daemon.process.send_signal(signal.SIGHUP)
                stop.wait(0.004)
    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        answers = ask_as(public, alice, *[set_limit(0, 350)] * 40)
    finally:
        stop.set()
        flipper.join()
    seen = collections.Counter((status, one_error(status, body, status) if body else "")
                               for status, body in answers)
    print("answers while the policy flipped: %s" % dict(seen))
    assert daemon.log().count("SIGHUP: reloaded the policy") > 10
    assert set(seen) <= expected, seen


# ---- Access: who may change what: policy 403, in use by others and the budget 409 ----

def test_refusals_are_one_403_naming_caller_table_allowed_and_asked_before_anything_runs(
        policed, people):
    node = policed.node
    bob, carol, alice, ghost, stranger = (people[name] for name in (
        "bob", "carol", "alice", "ghost", "stranger"))
    cases = [  # (person, request, expected 403 message or None if allowed, setter calls)
        (bob, set_limit(0, 450), "%s may set power limits of 200 to 400 W on GPU 0 (policy: "
                                 "%s); asked 450 W." % (who(bob), BOB_TABLE), None),
        (bob, set_limit("1,0", 450), "%s may set power limits of 200 to 400 W on GPU 0 (policy: "
                                     "%s); asked 450 W." % (who(bob), BOB_TABLE), None),
        (bob, set_limit(2, 220), "%s may set power limits of 250 to 500 W on GPU 2 (policy: "
                                 "%s); asked 220 W." % (who(bob), BOB_TABLE), None),
        (bob, set_limit(1, 450), None, [("nvmlDeviceSetPowerManagementLimit", "1", "450000")]),
        (bob, set_limit("0,1", 200.5), None,
         [("nvmlDeviceSetPowerManagementLimit", "0", "200500"),
          ("nvmlDeviceSetPowerManagementLimit", "1", "200500")]),
        (bob, persistence("1,0"), "%s may not set persistence mode on GPU 0 (policy: %s)."
         % (who(bob), BOB_TABLE), None),
        (bob, persistence(2), None, [("nvmlDeviceSetPersistenceMode", "2", "1")]),
        (bob, clocks("gpu", 0, 900, 2000), "%s may set locked GPU clocks of 900 to 1980 MHz on "
                                           "GPU 0 (policy: %s); asked 900 to 2000 MHz."
         % (who(bob), BOB_TABLE), None),
        (bob, clocks("gpu", 1, 800, 1400), "%s may set locked GPU clocks of 900 to 1980 MHz on "
                                           "GPU 1 (policy: %s); asked 800 to 1400 MHz."
         % (who(bob), BOB_TABLE), None),
        (bob, clocks("gpu", "0,1", 900, 1980), None,
         [("nvmlDeviceSetGpuLockedClocks", "0", "900", "1980"),
          ("nvmlDeviceSetGpuLockedClocks", "1", "900", "1980")]),
        (bob, clocks("gpu", 2, 900, 1000), "%s may not set locked GPU clocks on GPU 2 (policy: "
                                           "%s)." % (who(bob), BOB_TABLE), None),
        (bob, clocks("mem", 0, 900, 1000), "%s may not set locked memory clocks on GPU 0 "
                                           "(policy: %s)." % (who(bob), BOB_TABLE), None),
        (bob, clocks("mem", 2, 800, 1700), "%s may set locked memory clocks of 800 to 1600 MHz "
                                           "on GPU 2 (policy: %s); asked 800 to 1700 MHz."
         % (who(bob), BOB_TABLE), None),
        (bob, "POST /gpu/reset_gpu_locked_clocks?gpu_ids=2&block=true",
         "%s may not reset locked GPU clocks on GPU 2 (policy: %s)." % (who(bob), BOB_TABLE),
         None),
        (bob, "POST /gpu/reset_locked_clocks?gpu_ids=1,0&block=true",
         "%s may not reset locked memory clocks on GPU 0 (policy: %s)." % (who(bob), BOB_TABLE),
         None),
        (bob, "POST /gpu/reset_locked_clocks?gpu_ids=1&block=true", None,
         [("nvmlDeviceResetGpuLockedClocks", "1"), ("nvmlDeviceResetMemoryLockedClocks", "1")]),
        (carol, set_limit(0, 200), "%s may not change GPU 0 (policy: default allows GPUs 2)."
         % who(carol), None),
        (carol, set_limit("2,1", 200), "%s may not change GPU 1 (policy: default allows GPUs 2)."
         % who(carol), None),
        (carol, set_limit(2, 300), "%s may set power limits of 150 to 250 W on GPU 2 (policy: "
                                   "default); asked 300 W." % who(carol), None),
        (carol, set_limit(2, 149.999), "%s may set power limits of 150 to 250 W on GPU 2 "
                                       "(policy: default); asked 149.999 W." % who(carol), None),
        (carol, set_limit(2, 250), None, [("nvmlDeviceSetPowerManagementLimit", "2", "250000")]),
        (carol, clocks("gpu", 2, 900, 1000), "%s may not set locked GPU clocks (policy: "
                                             "default)." % who(carol), None),
        (carol, persistence(2), "%s may not set persistence mode (policy: default)."
         % who(carol), None),
        (alice, clocks("gpu", 0, 900, 1000), "%s may not set locked GPU clocks (policy: "
                                             "user.zptalice)." % who(alice), None),
        (alice, set_limit("0,1,2", 650), None,
         [("nvmlDeviceSetPowerManagementLimit", str(i), "650000") for i in range(3)]),
        (ghost, set_limit(0, 650), "uid %d may not change GPU 0 (policy: group.zptghost allows "
                                   "GPUs 1)." % ghost.uid, None),
        (ghost, set_limit(1, 650), None, [("nvmlDeviceSetPowerManagementLimit", "1", "650000")]),
        (stranger, set_limit(1, 200), "uid %d may not change GPU 1 (policy: default allows "
                                      "GPUs 2)." % stranger.uid, None),
    ]
    by_person = collections.OrderedDict()
    for case in cases:
        by_person.setdefault(case[0], []).append(case)
    for person, person_cases in by_person.items():
        before = len(node.calls(*POWER_SETTERS))
        answers = ask_as(policed.socket_path, person, *[case[1] for case in person_cases])
        expected_calls = []
        for (_, request, message, calls), (status, body) in zip(person_cases, answers):
            if message is None:
                assert (status, body) == (200, ""), (request, status, body)
                expected_calls += calls
            else:
                assert (status, json.loads(body)) == (403, {"error": message}), request
        # every refused request: nothing on any GPU; every allowed one: exactly its calls
        assert sorted(setters_since(node, before)) == sorted(expected_calls), person
    log_text = policed.log()
    assert " refused: policy %s" % BOB_TABLE in log_text
    assert "set_power_limit gpu=1,0 power_limit_mw=450000 block=true: refused: policy %s" \
           % BOB_TABLE in log_text
    assert "gpu=2 power_limit_mw=300000 block=true: refused: policy default" in log_text
    assert "gpu=0 power_limit_mw=650000 block=true: refused: policy group.zptghost" in log_text
    refused_lines = [line for line in log_text.splitlines() if ": refused: policy " in line]
    assert len(refused_lines) >= sum(1 for case in cases if case[2] is not None)


def test_uid_0_over_uds_is_never_refused_by_the_tables(policed):
    node = policed.node
    before = len(node.calls(*POWER_SETTERS))
    for request in (clocks("gpu", 0, 100, 3000), clocks("mem", 2, 100, 9000),
                    persistence("0,1,2"), set_limit("0,1,2", 100)):
        method, path = request.split(" ", 1)
        assert policed.request(method, path).status == 200, request
    assert len(setters_since(node, before)) == 2 + 3 + 3


def test_requests_that_change_nothing_never_look_at_process_lists(policed):
    node = policed.node
    before = len(node.calls())
    for path in ("/gpu/get_power", "/gpu/get_power_limit", "/gpu/get_power_limit_constraints",
                 "/gpu/get_persistence_mode", "/gpu/get_cumulative_energy?gpu_ids=0",
                 "/discover", "/metrics"):
        assert policed.get(path).status == 200, path
    names = set(call[0] for call in node.calls()[before:])
    assert not names & {"nvmlDeviceGetComputeRunningProcesses",
                        "nvmlDeviceGetGraphicsRunningProcesses"}, names


TOKEN_POLICY = """
    [default]
    gpus = [2]
    power_limit_w = [150, 250]

    [group.zptml]
    gpus = "all"
    power_limit_w = true

    [user.zptalice]
    gpus = "all"
    power_limit_w = true
    """


def test_tokens_match_user_tables_and_default_only_with_their_gpus_claim_on_top(
        node, key_path, start, people):
    path = write_policy(node.root, TOKEN_POLICY)
    daemon = start("--signing-key-path", key_path, "--policy", path, "--no-restore",
                   mode="tcp")
    bob_process = sleeper(people["bob"])  # TCP callers have no uid: never refused for it
    try:
        node.set_gpu(0, procs=[bob_process.pid])
        before = len(node.calls(*POWER_SETTERS))
        alice = token(CONTROL, sub="zptalice")
        assert daemon.request("POST", set_limit(0, 650).split(" ")[1], token=alice).status == 200
        assert setters_since(node, before) == [
            ("nvmlDeviceSetPowerManagementLimit", "0", "650000")]
        before = len(node.calls(*POWER_SETTERS))
        for sub in ("zptbob", "zptml", "zpt.alice", "user.zptalice", "zptalice ", "ZPTALICE",
                    "../zptalice", "zpt\u00e4lice"):
            response = daemon.request("POST", set_limit(0, 200).split(" ")[1],
                                      token=token(CONTROL, sub=sub))
            assert error_of(response, 403) == "user '%s' may not change GPU 0 (policy: default " \
                                              "allows GPUs 2)." % sub, sub
        response = daemon.request("POST", set_limit(2, 300).split(" ")[1],
                                  token=token(CONTROL, sub="zptbob"))
        assert error_of(response, 403) == "user 'zptbob' may set power limits of 150 to 250 W " \
                                          "on GPU 2 (policy: default); asked 300 W."
        claimed = claims_token(sub="zptalice", gpus=[1])
        response = daemon.request("POST", set_limit(0, 650).split(" ")[1], token=claimed)
        assert error_of(response, 403).startswith("Token for user 'zptalice' is not allowed "
                                                  "GPU(s) [0]")
        assert setters_since(node, before) == []
        assert daemon.request("POST", set_limit(1, 650).split(" ")[1],
                              token=claimed).status == 200
        view = daemon.get_json("/gpu/policy", token=claimed)
        assert view["table"] == "user.zptalice" and list(view["gpus"]) == ["1"]
        assert view["caller"] == {"uid": None, "user": "zptalice", "groups": []}
        admin = claims_token(sub="ops", admin=True)
        before = len(node.calls(*POWER_SETTERS))
        for request in (clocks("gpu", 0, 100, 3000), persistence("0,1"), set_limit(2, 100)):
            assert daemon.request("POST", request.split(" ")[1], token=admin).status == 200
        assert len(setters_since(node, before)) == 1 + 2 + 1
        assert daemon.get_json("/gpu/policy?gpu_ids=0", token=admin)["table"] == "exempt"
        assert "refused: policy default" in daemon.log()
    finally:
        stop_process(bob_process)


def test_a_gpu_running_another_uids_processes_is_409_to_all_but_them_and_root(
        node, start, public, people):
    """Without --policy: every value allowed, the in-use check still applies."""
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    daemon = start("--no-restore", socket_name=public)
    processes = [sleeper(bob), sleeper(alice), sleeper(carol)]
    bob_process, alice_process, carol_process = processes
    try:
        node.set_gpu(0, procs=[bob_process.pid])
        node.set_gpu(1, graphics_procs=[bob_process.pid], procs=[alice_process.pid])
        node.set_gpu(2, procs=[alice_process.pid, carol_process.pid])
        before = len(node.calls(*POWER_SETTERS))
        answers = ask_as(public, alice, set_limit(0, 650), set_limit("1,2", 650),
                         clocks("gpu", 0, 900, 1000), "GET /gpu/policy")
        assert [one_error(*answer, status=409) for answer in answers[:3]] == [
            in_use_message(0, bob), in_use_message(1, bob), in_use_message(0, bob)]
        assert setters_since(node, before) == []
        view = json.loads(answers[3][1])["gpus"]
        assert [view[str(i)]["in_use_by"] for i in range(3)] == [[bob.uid], [bob.uid],
                                                                 [carol.uid]]
        assert view["0"]["power_limit_mw"] == [100000, 700000] and view["0"]["persistence_mode"]
        # its own processes are no reason; another uid's are, whoever asks
        answers = ask_as(public, bob, set_limit(0, 650), set_limit(1, 650), set_limit(2, 650))
        assert answers[0] == [200, ""]
        assert one_error(*answers[1], status=409) == in_use_message(1, alice)
        assert one_error(*answers[2], status=409) == in_use_message(2, alice, carol)
        assert daemon.request("POST", set_limit("0,1,2", 640).split(" ")[1]).status == 200
        assert sorted(setters_since(node, before)) == sorted([
            ("nvmlDeviceSetPowerManagementLimit", "0", "650000")] + [
            ("nvmlDeviceSetPowerManagementLimit", str(i), "640000") for i in range(3)])
        log_text = daemon.log()
        assert "set_power_limit gpu=1,2 power_limit_mw=650000 block=true: refused: in use by " \
               "%d" % bob.uid in log_text
        assert "refused: in use by %d, %d" % (alice.uid, carol.uid) in log_text
        assert series(scrape(daemon), "zeusd_control_refusals_total", reason="in-use") == 5
    finally:
        for process in processes:
            stop_process(process)


def test_in_use_by_others_allow_turns_the_check_off(node, start, public, people):
    path = write_policy(node.root, """
        [node]
        in_use_by_others = "allow"
        [default]
        gpus = "all"
        power_limit_w = true
        """)
    daemon = start("--policy", path, "--no-restore", socket_name=public)
    bob_process = sleeper(people["bob"])
    try:
        node.set_gpu(0, procs=[bob_process.pid])
        assert ask_as(public, people["alice"], set_limit(0, 650), "GET /gpu/policy?gpu_ids=0")[0] \
            == [200, ""]
        assert ("nvmlDeviceSetPowerManagementLimit", "0", "650000") in node.calls()
    finally:
        stop_process(bob_process)


def test_a_process_list_that_cannot_be_read_refuses_nothing_and_is_logged_once(
        node, start, public, people):
    daemon = start("--no-restore", socket_name=public)
    bob_process = sleeper(people["bob"])
    try:
        node.set_gpu(0, procs=[bob_process.pid])
        node.set_gpu(1, graphics_procs=[bob_process.pid])
        node.update(fail={"nvmlDeviceGetComputeRunningProcesses": {"0": 3},
                           "nvmlDeviceGetGraphicsRunningProcesses": {"1": 999}})
        answers = ask_as(public, people["alice"], set_limit(0, 650), set_limit("0,1", 640),
                         set_limit(1, 630))
        assert answers == [[200, ""]] * 3
        log_text = daemon.log()
        for gpu in (0, 1):
            assert log_text.count("cannot list the processes on GPU %d" % gpu) == 1, log_text
        assert "cannot list the processes on GPU 2" not in log_text
    finally:
        stop_process(bob_process)


def test_a_pid_that_vanished_is_not_counted_and_one_the_daemon_cannot_see_is(
        node, start, public, people):
    daemon = start("--no-restore", socket_name=public)
    gone = subprocess.Popen(["true"])
    gone.wait()
    node.set_gpu(0, procs_once=[gone.pid])  # listed by NVML, gone from /proc, then unlisted
    node.set_gpu(1, procs=[gone.pid])  # listed by NVML every time, yet not in /proc
    answers = ask_as(public, people["alice"], set_limit(0, 650), set_limit(1, 650))
    assert answers[0] == [200, ""]
    assert one_error(*answers[1], status=409).startswith("GPU 1 is in use by processes of ")
    assert daemon.get_json("/gpu/policy?gpu_ids=1")["gpus"]["1"]["in_use_by"] == [None]


@pytest.mark.slow
def test_thousands_of_processes_on_a_gpu_still_answer_quickly(node, start, public, people):
    alice, bob = people["alice"], people["bob"]
    daemon = start("--no-restore", socket_name=public)
    threads = run_as(alice, unprivileged_python(), "-c", THREADS, "2000")
    bob_process = sleeper(bob)
    try:
        tids = json.loads(threads.stdout.readline().decode())  # 2000 of alice's own tasks
        pid_max = int(open("/proc/sys/kernel/pid_max").read())
        unseen = list(range(pid_max + 1, pid_max + 5001))
        node.set_gpu(0, procs=tids)
        node.set_gpu(1, procs=tids + [bob_process.pid], graphics_procs=tids)
        node.set_gpu(2, procs=unseen)
        started = time.monotonic()
        answers = ask_as(public, alice, set_limit(0, 650), set_limit(1, 650), set_limit(2, 650))
        took = time.monotonic() - started
        assert answers[0] == [200, ""]
        assert one_error(*answers[1], status=409) == in_use_message(1, bob)
        assert one_error(*answers[2], status=409).startswith("GPU 2 is in use by processes of ")
        assert took < 3.0, took
        print("3 requests over 2000 to 5000 pids each: %.3f s" % took)
    finally:
        stop_process(threads)
        stop_process(bob_process)


def test_a_raise_above_the_budget_is_409_with_the_numbers_and_uid_0_is_held_to_it(
        node, start):
    assert len(GPUS) == 3  # at 300 W each (GPU_DEFAULTS): 900 W
    node.update(keep_limits=True)
    path = write_policy(node.root, BUDGET_POLICY % 1000)
    daemon = start("--policy", path, "--no-restore")
    before = len(node.calls(*POWER_SETTERS))
    for request, gpus, watts, total in ((set_limit(0, 500), [0], 500, 1100),
                                        (set_limit("0,1", 400), [0, 1], 400, 1100),
                                        (set_limit("2,0,1", 334), [2, 0, 1], 334, 1002)):
        assert error_of(post(daemon, request), 409) == budget_message(1000, gpus, watts, total)
    assert setters_since(node, before) == []
    assert post(daemon, set_limit(0, 400)).status == 200  # exactly the budget
    assert node_limits(node) == {0: 400000, 1: 300000, 2: 300000}
    before = len(node.calls(*POWER_SETTERS))
    assert error_of(post(daemon, set_limit(1, 301)), 409) == budget_message(1000, [1], 301, 1001)
    assert error_of(post(daemon, set_limit(1, 300.5, block=False)), 409) == budget_message(
        1000, [1], 300.5, 1000.5)
    assert setters_since(node, before) == []
    assert post(daemon, set_limit(0, 350)).status == 200  # lowering
    assert post(daemon, set_limit("1,2", 325)).status == 200  # 350 + 325 + 325: the budget
    assert daemon.get_json("/gpu/policy")["budget"] == {"gpu_power_budget_w": 1000,
                                                        "power_limits_total_w": 1000.0}
    # a budget already below the total: only raises are refused
    write_policy(node.root, BUDGET_POLICY % 800)
    sighup_and_wait(daemon, "reloaded the policy")
    assert post(daemon, set_limit(0, 340)).status == 200  # lower: 990 W, still over 800
    assert post(daemon, set_limit(1, 325)).status == 200  # keeps the sum
    assert error_of(post(daemon, set_limit(2, 326)), 409) == budget_message(800, [2], 326, 991)
    assert node_limits(node) == {0: 340000, 1: 325000, 2: 325000}
    assert "refused: budget 800 W" in daemon.log() and "refused: budget 1000 W" in daemon.log()
    assert series(scrape(daemon), "zeusd_control_refusals_total", reason="budget") == 6


def test_a_lowering_passes_even_when_another_gpus_limit_cannot_be_read(node, start):
    node.update(keep_limits=True, fail={"nvmlDeviceGetPowerManagementLimit": {"2": 999}})
    path = write_policy(node.root, BUDGET_POLICY % 1000)
    daemon = start("--policy", path, "--no-restore")
    raised = post(daemon, set_limit(0, 350))  # the node's total is unknown: not a raise to allow
    assert "GPU 2" in error_of(raised, 503)
    assert node.calls(*POWER_SETTERS) == []
    assert post(daemon, set_limit(0, 250)).status == 200  # lowers the sum, whatever GPU 2's is
    assert node_limits(node)[0] == 250000


def test_concurrent_raises_that_each_fit_alone_never_pass_together(node, start):
    node.update(keep_limits=True, delay={"nvmlDeviceSetPowerManagementLimit": 0.03})
    path = write_policy(node.root, BUDGET_POLICY % 1000)
    daemon = start("--policy", path, "--no-restore")
    results = fire_together(len(RAISES), lambda i: post(daemon, set_limit(
        RAISES[i][0], RAISES[i][1], block=i % 2 == 0)))
    statuses = [response.status for response in results]
    assert set(statuses) <= {200, 409}, results
    # A 200 with block=false is a change queued: the GPU's worker checks the budget again,
    # and makes it or refuses it; either way, an audit line.
    queued = sum(1 for i, status in enumerate(statuses) if status == 200 and i % 2 == 1)
    wait_for(lambda: daemon.log().count(" block=false: ") == queued,
             "the queued changes to be made or refused")
    made = len(re.findall(r"audit: .* set_power_limit gpu=\d .*: ok\n", daemon.log()))
    assert made >= statuses[::2].count(200) and 1 <= made < len(RAISES), (made, statuses)
    limits = replay_within_budget(node, 1000000, {0: 300000, 1: 300000, 2: 300000})
    assert len(node.calls("nvmlDeviceSetPowerManagementLimit")) == made
    assert node_limits(node) == limits
    assert daemon.get_json("/gpu/policy")["budget"]["power_limits_total_w"] == \
        sum(limits.values()) / 1000.0
    for response in results:
        if response.status == 409:  # refused before it was queued, or on the GPU's worker
            body = response_json(response)
            message = body["error"] if list(body) == ["error"] else errors_of(response, 409)[
                str(RAISES[results.index(response)][0])]
            assert message.startswith("The node's GPU power budget is 1000 W: "), body


def test_concurrent_raises_through_two_daemons_of_the_node_never_pass_together(node, start):
    node.update(keep_limits=True, delay={"nvmlDeviceSetPowerManagementLimit": 0.03})
    path = write_policy(node.root, BUDGET_POLICY % 1000)
    state = os.path.join(node.root, "state")
    daemons = [start("--policy", path, "--state-dir", state, mode="tcp") for _ in range(2)]
    results = fire_together(len(RAISES), lambda i: post(daemons[i % 2], set_limit(
        RAISES[i][0], RAISES[i][1])))
    statuses = [response.status for response in results]
    assert set(statuses) <= {200, 409}, results
    assert statuses.count(200) >= 1
    limits = replay_within_budget(node, 1000000, {0: 300000, 1: 300000, 2: 300000})
    assert len(node.calls("nvmlDeviceSetPowerManagementLimit")) == statuses.count(200)
    assert node_limits(node) == limits


def test_restores_and_releases_are_never_refused(node, start, public, people):
    alice = people["alice"]
    node.update(keep_limits=True)
    path = write_policy(node.root, BUDGET_POLICY % 1000)
    daemon = start("--policy", path, "--enable", "gpu-control,gpu-read", socket_name=public)
    holder = Client(public, set_limit(0, 200), uid=alice.uid)  # holds GPU 0: 800 W in all
    try:
        assert holder.answers == [[200, ""]]
        assert post(daemon, set_limit(1, 500)).status == 200  # root: 1000 W, the budget
        write_policy(node.root, BUDGET_POLICY.replace('"all"', "[]") % 1000)
        sighup_and_wait(daemon, "reloaded the policy")
        before = len(node.calls(*POWER_SETTERS))
        answers = ask_as(public, alice, set_limit(0, 150), "POST /gpu/release?gpu_ids=0")
        assert one_error(*answers[0], status=403) == "%s may not change GPU 0 (policy: default " \
                                                     "allows no GPU)." % who(alice)
        assert answers[1][0] == 200, answers  # the policy never refuses a release
        assert setters_since(node, before)[0] == ("nvmlDeviceSetPowerManagementLimit", "0",
                                                   "300000")
        assert "audit: restore gpu=0 power_limit_mw=300000 persistence=1 clocks=reset " \
               "reason=released: ok" in daemon.log()
        assert node_limits(node) == {0: 300000, 1: 500000, 2: 300000}  # 1100 W: over
        assert post(daemon, set_limit(1, 450)).status == 200  # lowering passes
        assert error_of(post(daemon, set_limit(2, 310)), 409) == budget_message(
            1000, [2], 310, 1060)
    finally:
        holder.end()


def test_refusals_are_counted_by_reason_with_their_audit_lines(node, start, public, people):
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    node.update(keep_limits=True)
    path = write_policy(node.root, """
        [node]
        gpu_power_budget_w = 1000
        [default]
        gpus = "all"
        power_limit_w = [150, 600]
        """)
    daemon = start("--policy", path, "--enable", "gpu-control,gpu-read", socket_name=public)
    carol_process = sleeper(carol)
    holder = None
    try:
        node.set_gpu(2, procs=[carol_process.pid])
        node.update(keep_limits=True)
        before = len(node.calls(*POWER_SETTERS))
        holder = Client(public, set_limit(0, 100), set_limit(2, 200), "POST /gpu/hold?gpu_ids=2",
                        set_limit(1, 500), set_limit(0, 200), uid=alice.uid)
        answers = holder.answers
        assert one_error(*answers[0], status=403) == "%s may set power limits of 150 to 600 W " \
            "on GPU 0 (policy: default); asked 100 W." % who(alice)
        assert one_error(*answers[1], status=409) == in_use_message(2, carol)
        assert one_error(*answers[2], status=409) == in_use_message(2, carol)
        assert one_error(*answers[3], status=409) == budget_message(1000, [1], 500, 1100)
        assert answers[4] == [200, ""]
        [held] = ask_as(public, bob, set_limit(0, 250))
        assert one_error(*held, status=409).startswith("GPU 0 is held by uid %d" % alice.uid)
        assert setters_since(node, before) == [("nvmlDeviceSetPowerManagementLimit", "0",
                                                 "200000")]
        samples = scrape(daemon)
        assert {reason: series(samples, "zeusd_control_refusals_total", reason=reason)
                for reason in ("policy", "in-use", "budget", "held")} == {
            "policy": 1, "in-use": 2, "budget": 1, "held": 1}
        log_text = daemon.log()
        for note in ("refused: policy default", "refused: in use by %d" % carol.uid,
                     "hold gpu=2: refused: in use by %d" % carol.uid,
                     "refused: budget 1000 W", "refused: held"):
            assert note in log_text, note
    finally:
        if holder is not None:
            holder.end()
        stop_process(carol_process)


# ---- HTTP, metrics: the families and values, demand-driven, by token ----

def test_metrics_families_and_values(node, start):
    daemon = start()
    daemon.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&block=true")
    daemon.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=900000&block=true")
    daemon.post("/gpu/set_gpu_locked_clocks?gpu_ids=1&min_clock_mhz=2&max_clock_mhz=1&block=true")
    samples = scrape(daemon)
    assert series(samples, "zeusd_gpu_info", gpu=2, name="NVIDIA H100 80GB HBM3",
                  pci_address="0000:c1:00.0", uuid="GPU-00000002-0000-0000-0000-000000000000") == 1
    assert series(samples, "zeusd_gpu_power_watts", gpu=0) == 76.0
    assert series(samples, "zeusd_gpu_power_watts", gpu=1) == 120.0
    assert series(samples, "zeusd_gpu_energy_joules_total", gpu=0) == 123.456
    assert series(samples, "zeusd_gpu_energy_joules_total", gpu=1) is None
    assert series(samples, "zeusd_gpu_power_limit_watts", gpu=1) == 300.0
    assert series(samples, "zeusd_gpu_power_limit_min_watts", gpu=1) == 100.0
    assert series(samples, "zeusd_gpu_power_limit_max_watts", gpu=1) == 700.0
    assert series(samples, "zeusd_cpu_info", cpu=1, zone="psys") == 1
    assert series(samples, "zeusd_cpu_energy_joules_total", cpu=0, domain="dram") == 0.005
    assert series(samples, "zeusd_cpu_energy_joules_total", cpu=1, domain="dram") is None
    assert series(samples, "zeusd_cpu_power_watts", cpu=0, domain="package") == 0.0
    assert series(samples, "zeusd_build_info", version=zeusd.__version__,
                  python=daemon_python_version()) == 1
    assert series(samples, "zeusd_http_requests_total", path="/gpu/set_power_limit",
                  status=200) == 1
    assert series(samples, "zeusd_http_requests_total", path="/gpu/set_power_limit",
                  status=400) == 1
    assert series(samples, "zeusd_gpu_control_operations_total", operation="set_power_limit",
                  result="ok") == 1
    assert series(samples, "zeusd_gpu_control_operations_total", operation="set_power_limit",
                  result="error") is None
    assert series(samples, "zeusd_gpu_control_operations_total",
                  operation="set_gpu_locked_clocks", result="error") == 1
    assert series(samples, "zeusd_stream_subscribers", kind="gpu") == 0
    assert 0 < series(samples, "process_resident_memory_bytes") < 1e9
    assert abs(series(samples, "process_start_time_seconds") - time.time()) < 60
    assert series(samples, "process_open_fds") > 3 and series(samples, "process_cpu_seconds_total")
    daemon.get("/no/such/path")
    stream = daemon.stream("/cpu/stream_power")
    assert stream.next_event() is not None  # delivered to it: it is a subscriber
    samples = scrape(daemon)
    assert series(samples, "zeusd_http_requests_total", path="other", status=404) == 1
    assert series(samples, "zeusd_stream_subscribers", kind="cpu") == 1
    stream.close()


def test_metrics_are_demand_driven_and_leave_failing_devices_out(node, start):
    daemon = start("--enable", "gpu-read")
    scrape(daemon)
    settled = len(node.calls())
    assert not happens_within(lambda: len(node.calls()) != settled, 0.3)
    node.update(fail={"nvmlDeviceGetTotalEnergyConsumption": {"0": 15},
                      "nvmlDeviceGetFieldValues": {"2": 999}})
    for _ in range(2):
        samples = scrape(daemon)
        assert series(samples, "zeusd_gpu_energy_joules_total", gpu=0) is None
        assert series(samples, "zeusd_gpu_power_watts", gpu=2) is None
        assert series(samples, "zeusd_gpu_power_watts", gpu=0) == 76.0
        assert series(samples, "zeusd_gpu_energy_joules_total", gpu=2) == 5.0
    assert sum("nvmlDeviceGetTotalEnergyConsumption failed on GPU 0" in line
               for line in daemon.log().splitlines() if " ERROR " in line) == 1
    node.update(fail={})
    assert series(scrape(daemon), "zeusd_gpu_energy_joules_total", gpu=0) == 123.456
    assert "GPU 0 (energy) reads again" in daemon.log()
    assert "zeusd_cpu" not in daemon.get("/metrics").body.decode()


def test_metrics_follow_token_scopes_and_gpus(key_path, start):
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-read,cpu-read,gpu-control")
    assert daemon.get("/metrics").status == 401
    cpu_only = scrape(daemon, token(["cpu-read"]))
    assert not any(name.startswith("zeusd_gpu_info") for name, _ in cpu_only)
    assert series(cpu_only, "zeusd_cpu_info", cpu=0, zone="package-0") == 1
    limited = scrape(daemon, gpu_token([1]))
    assert sorted(dict(labels)["gpu"] for name, labels in limited
                  if name == "zeusd_gpu_power_watts") == ["1"]
    assert not any(name == "zeusd_cpu_info" for name, _ in limited)
    node_wide = ("zeusd_http_requests_total", "zeusd_gpu_control_operations_total",
                 "zeusd_stream_subscribers")
    assert not any(name in node_wide for name, _ in limited)
    assert any(name == "zeusd_http_requests_total"
               for name, _ in scrape(daemon, token(["cpu-read"])))
    disabled = start("--enable", "gpu-control", socket_name="control-only.sock")
    assert "Neither API group" in error_of(disabled.get("/metrics"), 404)


# ---- HTTP, streams: SSE framing, formats, keep-alive comments, slow and gone readers ----

def test_stream_framing_and_first_event(daemon):
    started = time.monotonic()
    stream = daemon.stream("/gpu/stream_power?gpu_ids=0,2")
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.headers["cache-control"] == "no-cache"
    events = [stream.next_event(timeout=1.0) for _ in range(2)]
    assert time.monotonic() - started < 1.0
    assert sorted((event["gpu_id"], event["power_mw"]) for event in events) == [
        (0, 76000), (2, 99000)]
    assert abs(events[0]["timestamp_ms"] - time.time() * 1000) < 2000
    stream.close()


def test_per_device_stream_format(node, start):
    daemon = start("--stream-format", "per-device", "--gpu-power-poll-hz", "50",
                   "--cpu-power-poll-hz", "20")
    stream = daemon.stream("/gpu/stream_power?gpu_ids=2,0")
    started = time.monotonic()
    first = [stream.next_event(), stream.next_event()]
    assert time.monotonic() - started < 0.1
    assert sorted((e["gpu_id"], e["power_mw"]) for e in first) == [(0, 76000), (2, 99000)]
    assert all(sorted(e) == ["gpu_id", "power_mw", "timestamp_ms"] for e in first)
    node.set_gpu(2, instant_mw=55000)
    event = stream.next_event()
    assert (event["gpu_id"], event["power_mw"]) == (2, 55000)
    assert stream.next_event(timeout=0.2) is None
    stream.close()
    with RaplTicker(node, {"intel-rapl:0": (1000000, 50.0), "intel-rapl:1": (7, 20.0)}):
        cpu_stream = daemon.stream("/cpu/stream_power")
        events, deadline = {}, time.monotonic() + TIMEOUT
        # until CPU 1's power is in range: a window in which this process's ticker was held
        # up (a loaded machine) reads low
        while len(events) < 2 or not 15000 < events[1]["cpu_mw"] < 25000:
            assert time.monotonic() < deadline, events
            event = cpu_stream.next_event()
            events[event["cpu_id"]] = event
        assert sorted(events[0]) == ["cpu_id", "cpu_mw", "dram_mw", "timestamp_ms"]
        assert events[1]["dram_mw"] is None
        cpu_stream.close()


def test_cpu_stream_events(node, start):
    daemon = start("--stream-format", "all-devices", "--cpu-power-poll-hz", "4")
    with RaplTicker(node, {"intel-rapl:0": (1000000, 50.0)}):
        started = time.monotonic()
        stream = daemon.stream("/cpu/stream_power")
        event = stream.next_event(timeout=1.0)
        assert time.monotonic() - started < 0.25, "first event later than one period"
        assert set(event["power_mw"]) == {"0", "1"}
        assert set(event["power_mw"]["0"]) == {"cpu_mw", "dram_mw"}
        assert stream.next_event(timeout=1.0) is not None
        stream.close()


def test_keep_alive_comment_after_quiet_period():
    left, right = socket.socketpair()
    subscriber = zeusd.SseSubscriber(left, (0,), False, "GPU")
    sample = gpu_sample({0: 5})
    now = time.monotonic()
    subscriber.deliver(sample, now)
    subscriber.deliver(sample, now + 1)
    subscriber.deliver(sample, now + 1 + zeusd.KEEPALIVE_COMMENT_S)
    right.settimeout(1)
    data = right.recv(4096)
    assert data.startswith(b'data: {"timestamp_ms": ') and data.endswith(
        b', "power_mw": {"0": 5}}\n\n: keep-alive\n\n')
    left.close()
    right.close()


def test_slow_stream_reader_is_dropped():
    left, right = socket.socketpair()
    subscriber = zeusd.SseSubscriber(left, (0,), False, "GPU")
    now = time.monotonic()
    for value in range(100000):
        subscriber.deliver(gpu_sample({0: value}), now)
        if subscriber.closed:
            break
    assert subscriber.closed
    left.close()
    right.close()


def test_disconnected_streams_leave_no_thread_behind(start):
    daemon = start()
    wait_for(lambda: daemon.threads() == IDLE_THREADS, "an idle daemon")
    streams = [daemon.stream("/gpu/stream_power") for _ in range(20)]
    streams += [daemon.stream("/cpu/stream_power") for _ in range(5)]
    for stream in streams[:20]:
        assert stream.next_event() is not None
    assert daemon.threads() == IDLE_THREADS + 25
    for stream in streams:
        stream.close()
    wait_for(lambda: daemon.threads() == IDLE_THREADS, "stream threads to end")
    assert daemon.get("/time").status == 200


# ---- HTTP, control handlers: changes checked before they run, holds, releases and receipts ----

def test_power_limit_outside_the_range_is_400_naming_it_and_runs_nothing(node, start):
    daemon = start()
    response = daemon.post("/gpu/set_power_limit?gpu_ids=0,1&power_limit_mw=4294967295&block=true")
    assert errors_of(response, 400) == {
        "0": "power_limit_mw=4294967295 is outside GPU 0's power limit range, 100000 to "
             "700000 mW",
        "1": "power_limit_mw=4294967295 is outside GPU 1's power limit range, 100000 to "
             "700000 mW"}
    response = daemon.post("/gpu/set_power_limit?gpu_ids=0,2&power_limit_mw=50000&block=false")
    assert set(errors_of(response, 400)) == {"0", "2"}
    assert node.calls(*POWER_SETTERS) == []


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run clients as another uid")
def test_post_gpu_hold_holds_without_a_change_under_the_rules_of_a_change(node, start, public):
    daemon = start("--enable", "gpu-control,gpu-read", socket_name=public)
    alice = Client(public, "POST /gpu/hold?gpu_ids=0,2", uid=1001)
    assert alice.answers == [[200, ""]]
    assert node.calls(*POWER_SETTERS) == []  # held, nothing changed
    holds = daemon.get_json("/gpu/holds")
    assert sorted(holds) == ["0", "2"] and holds["0"]["uid"] == 1001
    assert holds["0"]["changes"] == [] and holds["0"]["saved"] == SAVED_AT_START
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(holds["0"]["since_ms"] // 1000))
    message = ("GPU 0 is held by uid 1001 (session %d, since %s): its settings are restored "
               "when that session ends or releases it." % (alice.pid, since))
    bob = Client(public, SET_0, "POST /gpu/hold?gpu_ids=0", "POST /gpu/hold?gpu_ids=1,0",
                 uid=1002)
    assert bob.answers == [[409, json.dumps({"error": message})]] * 3
    assert "1" not in daemon.get_json("/gpu/holds")  # nothing done on any GPU of the request
    assert node.calls(*POWER_SETTERS) == []
    assert daemon.post("/gpu/hold?gpu_ids=0").status == 200  # root: never refused
    assert daemon.get_json("/gpu/holds")["0"]["uid"] == 1001  # the hold stays alice's
    assert error_of(daemon.post("/gpu/hold"), 400)  # gpu_ids required
    assert daemon.get("/gpu/hold?gpu_ids=0").status == 405
    restored_within(daemon, node, alice.end(), count=2)
    assert setters(node) == RESTORE_CALLS  # restored like any hold
    receipts = wait_receipts(node, 2)
    assert sorted(receipt["gpu"] for receipt in receipts) == [0, 2]
    assert all(receipt["changes"] == [] and receipt["uid"] == 1001 for receipt in receipts)
    assert daemon.get_json("/gpu/holds") == {}
    bob.end()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a daemon with gpu-control")
def test_post_gpu_hold_over_tcp_needs_an_owner_and_the_tokens_scope(node, key_path, start):
    unowned = start("--enable", "gpu-control,gpu-read", mode="tcp")
    response = unowned.post("/gpu/hold?gpu_ids=0")
    assert error_of(response, 403) == "Holding a GPU needs an owner: a Unix-socket caller or a " \
                                      "token."
    assert unowned.get_json("/gpu/holds") == {}
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-control,gpu-read",
                   mode="tcp")
    alice = token(["gpu-control", "gpu-read"])
    assert error_of(daemon.post("/gpu/hold?gpu_ids=0", token=token(["gpu-read"])), 403)
    assert error_of(daemon.post("/gpu/hold?gpu_ids=0", token=gpu_token([2])), 403)
    assert daemon.post("/gpu/hold?gpu_ids=0", token=alice).status == 200
    assert daemon.post("/gpu/hold?gpu_ids=0", token=alice).status == 200  # extends it
    assert error_of(daemon.post("/gpu/hold?gpu_ids=0", token=token(["gpu-control"], sub="bob")),
                    409).startswith("GPU 0 is held by user 'alice' (since ")
    assert error_of(daemon.post(SET_0_PATH, token=token(["gpu-control"], sub="bob")), 409)
    assert node.calls(*POWER_SETTERS) == []
    node.set_gpu(0, energy_mj=123456 + 1500)
    answer = json_body_of(daemon.post("/gpu/release", token=alice))
    assert list(answer) == ["0"]
    receipt = answer["0"]
    assert (receipt["uid"], receipt["user"], receipt["job"]) == (None, "alice", None)
    assert (receipt["energy_j"], receipt["reason"], receipt["changes"]) == (1.5, "released", [])
    assert receipts_on_file(node) == [receipt]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a daemon with gpu-control")
def test_post_gpu_hold_follows_the_policys_gpus(node, key_path, start):
    policy = os.path.join(node.root, "policy.toml")
    with open(policy, "w") as policy_file:
        policy_file.write('[user.alice]\ngpus = [0]\npower_limit_w = true\n')
    os.chmod(policy, 0o600)
    daemon = start("--signing-key-path", key_path, "--policy", policy, "--enable",
                   "gpu-control,gpu-read", mode="tcp")
    alice = token(["gpu-control", "gpu-read"])
    assert error_of(daemon.post("/gpu/hold?gpu_ids=0,2", token=alice), 403)
    assert error_of(daemon.post("/gpu/hold?gpu_ids=0", token=token(["gpu-control"], sub="bob")),
                    403)  # no table names bob, and there is no [default]
    assert daemon.get_json("/gpu/holds", token=alice) == {}
    assert daemon.post("/gpu/hold?gpu_ids=0", token=alice).status == 200
    assert list(daemon.get_json("/gpu/holds", token=alice)) == ["0"]
    assert list(json_body_of(daemon.post("/gpu/release", token=alice))) == ["0"]


def test_release_answers_the_receipts_of_the_holds_it_ended(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    assert json_body_of(daemon.post("/gpu/release")) == {}
    assert daemon.post("/gpu/hold?gpu_ids=0,1,2").status == 200
    node.set_gpu(2, energy_mj=5000 + 2000)
    answer = json_body_of(daemon.post("/gpu/release?gpu_ids=0,2"))
    assert sorted(answer) == ["0", "2"]
    assert answer["2"]["energy_j"] == 2.0 and answer["0"]["energy_j"] == 0.0
    assert all(receipt["reason"] == "released" for receipt in answer.values())
    on_file = {str(receipt["gpu"]): receipt for receipt in receipts_on_file(node)}
    assert on_file == answer  # on file before the release answered
    assert json_body_of(daemon.post("/gpu/release?gpu_ids=0")) == {}
    assert list(daemon.get_json("/gpu/holds")) == ["1"]
    status, out, err = run_cli("release", "--socket-path", daemon.socket_path)
    assert status == 0 and err == "", err
    assert out.startswith("GPU 1: restored power_limit_mw=300000 persistence=1 clocks=reset "
                          "(released); held by ") and "energy unknown" in out, out
    assert len(receipts_on_file(node)) == 3
    daemon.post("/gpu/hold?gpu_ids=2")
    node.set_gpu(2, energy_mj=5000 + 2000 + 51234125)
    status, out, err = run_cli("release", "--socket-path", daemon.socket_path, "--gpus", "2")
    assert status == 0 and err == "" and out.count("\n") == 1
    assert out.startswith("GPU 2: restored ") and out.endswith(": 51234.125 J\n"), out
    status, out, _ = run_cli("release", "--socket-path", daemon.socket_path)
    assert status == 0 and out.startswith("nothing to release")


def test_a_release_while_the_watcher_restores_waits_for_its_receipt(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, SET_0)
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": {"0": 0.8}})
    client.end()
    restore_begun(node, "0")
    response, seconds = timed(daemon.post, "/gpu/release?gpu_ids=0")
    assert response.status == 200
    assert len(receipts_on_file(node)) == 1, (seconds, receipt_file_lines(node))
    assert receipts_on_file(node)[0]["reason"] == "session-ended"


def test_a_release_racing_the_watchers_start_of_a_restore_waits_for_its_receipt(node, start):
    """The watcher has decided to restore GPU 0 (its session ended) and waits for the state
    file's lock (held here, as another daemon of the node may hold it); a release of GPU 0
    arrives and waits for the lock too. Whichever goes first, the release answers after GPU
    0's receipt is on file."""
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, SET_0)
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": {"0": 0.5}})
    lock = os.open(state_path(node, "holds.lock"), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client.end()
        time.sleep(0.3)  # the watcher is waiting for the lock
        release = in_background(daemon.post, "/gpu/release?gpu_ids=0")
        time.sleep(0.3)  # the release too
    finally:
        os.close(lock)
    response, _ = release()
    on_file = receipts_on_file(node)
    assert response.status == 200
    assert len(on_file) == 1, ("the release answered %r before the receipt was on file"
                               % (response.body,))


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_a_release_through_another_daemon_of_the_node_waits_for_the_receipt(node, start):
    """Two daemons on one state directory (SPEC §11: a normal setup): the watcher of the one
    restores the GPU, the epilog's release reaches the other."""
    watcher = start("--enable", "gpu-control,gpu-read")
    other = start("--enable", "gpu-control,gpu-read", socket_name="other.sock")
    client = Client(watcher.socket_path, SET_0)
    node.update(delay={"nvmlDeviceSetPowerManagementLimit": {"0": 0.6}})
    client.end()
    restore_begun(node, "0")
    response = other.post("/gpu/release?gpu_ids=0")
    assert response.status == 200
    assert len(receipts_on_file(node)) == 1, ("the release answered %r before the receipt was "
                                              "on file" % (response.body,))


# ---- HTTP, read handlers: discovery, health, time, unknown ids, constraints ----

def test_discover(daemon):
    assert daemon.get_json("/discover") == {
        "gpu_ids": [0, 1, 2], "cpu_ids": [0, 1], "dram_available": [True, False],
        "enabled_api_groups": ["gpu-control", "gpu-read", "cpu-read"], "auth_required": False,
        "gpus": [
            {"id": 0, "name": "NVIDIA H100 80GB HBM3", "pci_address": "0000:00:06.0",
             "cumulative_energy_available": True},
            {"id": 1, "name": "NVIDIA A40", "pci_address": "0000:41:00.0",
             "cumulative_energy_available": False},
            {"id": 2, "name": "NVIDIA H100 80GB HBM3", "pci_address": "0000:c1:00.0",
             "cumulative_energy_available": True}],
        "cpus": [{"id": 0, "name": "package-0", "dram_available": True},
                 {"id": 1, "name": "psys", "dram_available": False}],
        "version": zeusd.__version__, "stream_format": "per-device"}
    assert "streams: per-device (for Zeus 0.16 and newer" in daemon.log()


def test_health(node, start):
    daemon = start("--enable", "gpu-read", "--gpu-power-poll-hz", "100")
    assert daemon.get_json("/health") == {"status": "ok"}
    node.update(fail={"nvmlDeviceGetFieldValues": {"2": 15}})
    wait_for(lambda: daemon.get("/gpu/get_power").status == 500, "GPU 2 to fail")
    assert error_of(daemon.get("/health"), 503) == (
        "nvmlDeviceGetFieldValues failed on GPU 2: GPU is lost (NVML error 15)")
    assert series(scrape(daemon), "zeusd_device_read_errors_total", kind="gpu", device=2) >= 1
    node.update(fail={})
    wait_for(lambda: daemon.get("/gpu/get_power").status == 200, "GPU 1 to read again")
    assert daemon.get_json("/health") == {"status": "ok"}


def test_health_is_degraded_when_nvml_did_not_load(node, start):
    node.update(init_fail=12)
    daemon = start("--enable", "gpu-read")
    health = daemon.get_json("/health")
    assert list(health) == ["status", "problems"] and health["status"] == "degraded", health
    assert len(health["problems"]) == 1 and health["problems"][0].startswith(
        "NVML is not available (") and health["problems"][0].endswith("): serving zero GPUs")
    assert daemon.get("/health?strict=true").status == 503
    if IS_ROOT:  # cpu-read needs root: a daemon that does not read GPUs needs no NVML
        cpus_only = start("--enable", "cpu-read", socket_name="cpus.sock")
        assert cpus_only.get_json("/health") == {"status": "ok"}
        assert cpus_only.get("/health?strict=true").status == 200


def test_time(daemon):
    before = int(time.time() * 1000)
    stamp = daemon.get_json("/time")["timestamp_ms"]
    assert before - 5 <= stamp <= int(time.time() * 1000) + 5


def test_unknown_gpu_ids_on_power(daemon):
    message = error_of(daemon.get("/gpu/get_power?gpu_ids=0,7,9"), 400)
    assert message == "Unknown GPU indices: [7, 9]. Available: [0, 1, 2]"
    message = error_of(daemon.get("/gpu/stream_power?gpu_ids=5"), 400)
    assert message == "Unknown GPU indices: [5]. Available: [0, 1, 2]"


def test_unknown_cpu_ids_on_power(daemon):
    assert error_of(daemon.get("/cpu/get_power?cpu_ids=3"), 400) == \
        "Unknown CPU indices: [3]. Available: [0, 1]"
    assert error_of(daemon.get("/cpu/stream_power?cpu_ids=0,4"), 400) == \
        "Unknown CPU indices: [4]. Available: [0, 1]"


def test_constraints_are_the_callers_range_within_the_gpus(policed, people):
    answers = {name: ask_as(policed.socket_path, people[name],
                            "GET /gpu/get_power_limit_constraints")[0]
               for name in ("alice", "bob", "carol")}

    def ranges(answer):
        status, body = answer
        assert status == 200, answer
        return {gpu: [value["min_power_limit_mw"], value["max_power_limit_mw"]]
                for gpu, value in json.loads(body).items()}
    own = [100000, 700000]
    assert ranges(answers["alice"]) == {"0": own, "1": own, "2": own}
    assert ranges(answers["bob"]) == {"0": [200000, 400000], "1": [200000, 500000],
                                      "2": [250000, 500000]}
    assert ranges(answers["carol"])["2"] == [150000, 250000]
    assert policed.get_json("/gpu/get_power_limit_constraints") == {
        str(i): {"min_power_limit_mw": 100000, "max_power_limit_mw": 700000} for i in range(3)}


# ---- HTTP, API: routes, methods, disabled groups, the order of checks ----

def test_unknown_path_is_404(daemon):
    assert "/gpu/get_powerz" in error_of(daemon.get("/gpu/get_powerz"), 404)
    error_of(daemon.get("/"), 404)


@pytest.mark.parametrize("method, path, allowed", [
    ("POST", "/discover", "GET"), ("HEAD", "/time", "GET"), ("OPTIONS", "/gpu/get_power", "GET"),
    ("GET", "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=1&block=true", "POST"),
    ("DELETE", "/cpu/get_power", "GET"), ("PUT", "/gpu/stream_power", "GET"),
])
def test_wrong_method_is_405_with_allow(daemon, method, path, allowed):
    response = daemon.request(method, path)
    assert response.status == 405 and response.headers["allow"] == allowed
    if method != "HEAD":
        error_of(response, 405)
    else:
        assert int(response.headers["content-length"]) > 0


def test_disabled_groups_answer_404_with_the_documented_message(start):
    daemon = start("--enable", "gpu-read")
    for method, path, group in (("POST", "/gpu/set_power_limit", "gpu-control"),
                                ("GET", "/gpu/set_power_limit", "gpu-control"),
                                ("GET", "/cpu/get_power?bad=1", "cpu-read"),
                                ("GET", "/cpu/stream_power", "cpu-read")):
        assert error_of(daemon.request(method, path), 404) == \
            "API group '%s' is not enabled on this server." % group
    assert daemon.get("/gpu/get_power").status == 200
    assert error_of(daemon.get("/auth/whoami"), 404) == \
        "Authentication is not enabled on this server."


def test_order_of_checks(key_path, start):
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-read")
    reader = token(["gpu-read"])
    assert error_of(daemon.post("/gpu/set_power_limit"), 404).startswith("API group 'gpu-control'")
    assert error_of(daemon.get("/cpu/get_power", token="junk"), 404).startswith("API group")
    assert daemon.get("/nowhere").status == 401
    assert daemon.get("/nowhere", token=reader).status == 404
    assert daemon.post("/gpu/get_power").status == 401
    assert daemon.post("/gpu/get_power", token=reader).status == 405
    assert daemon.get("/gpu/get_power?bad=1", token=token(["cpu-read"])).status == 403
    assert daemon.get("/gpu/get_power?bad=1", token=reader).status == 400


# ---- HTTP, heads: the cache and the full reading agree, unread fields checked and left out ----

HEADS = [
    b"GET /time HTTP/1.1\r",
    b"GET /a?b=1 HTTP/1.0\r\nConnection: keep-alive\r\nHost: x\r",
    b"POST /x HTTP/1.1\r\nContent-Length: 3\r\ncontent-length:3 \r\nX-Id: 1\r",
    b"GET /x HTTP/1.1\r\nConnection: a\r\nCONNECTION: \tb\r\nX-Tab:\tv\t\r",
    b"GET http://h/x?y HTTP/1.1\r\nAuthorization: Bearer t\r\nExpect: 100-continue\r",
    b"GET /x HTTP/1.1\r\nHost: x\nX-Bare: lf\r",
    b"GET /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r",
    b"GET /x HTTP/1.1\r\nX Id: 1\r",
    b"GET /x HTTP/1.1\r\nX-Id: a\x00b\r",
    b"GET /x HTTP/1.1\r\nX-Id: a\rb\r",
    b"GET /x HTTP/1.1\r\nConnectionx: close\r",
    b"GET /x HTTP/2.0\r\nHost: x\r",
    b"GET /x HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"X-A: b\r",
]


def head_answer(read, head):
    """What reading a head gives: the Request's fields, or the error's status and message."""
    try:
        return tuple(read(head))
    except zeusd.HttpError as err:
        return err.status, err.message


def test_a_head_reads_the_same_from_the_line_cache_and_in_full():
    for head in HEADS:
        in_full = head_answer(zeusd.parse_head_in_full, head)
        assert head_answer(zeusd.parse_head, head) == in_full, head
        assert head_answer(zeusd.parse_head, head) == in_full, head  # now from the cache


def test_fields_the_daemon_does_not_read_are_checked_then_left_out():
    request = zeusd.parse_head(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Id: 1\r\nConnection: a\r\n"
                               b"connection: b\r\nX-Id: 2\r")
    assert request.headers == {"connection": "a, b"}
    with pytest.raises(zeusd.HttpError) as raised:
        zeusd.parse_head(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Id: \x01\r")
    assert raised.value.status == 400


def test_a_head_that_differs_only_in_unread_fields_is_the_same_request():
    last = zeusd.parse_head(b"GET /time HTTP/1.1\r\nHost: x\r\nX-Request-Id: 1\r")
    same = b"GET /time HTTP/1.1\r\nHost: y\r\nX-Request-Id: 2\r"
    assert zeusd.parse_head(same, None, last) is last
    for other in (b"GET /time HTTP/1.1\r\nHost: x\r\nConnection: close\r",
                  b"GET /time?x=1 HTTP/1.1\r\nHost: x\r", b"HEAD /time HTTP/1.1\r",
                  b"GET /time HTTP/1.0\r"):
        request = zeusd.parse_head(other, None, last)
        assert request is not last and request == zeusd.parse_head_in_full(other)


def test_a_tracing_client_that_asks_to_close_is_closed(daemon):
    """A keep-alive client whose heads differ in a request id each time, then in Connection."""
    connection = daemon.connect()
    for request_id in range(3):
        response = connection.request("GET", "/time", {"X-Request-Id": str(request_id)})
        assert response.status == 200 and "connection" not in response.headers
    response = connection.request("GET", "/time", {"X-Request-Id": "3", "Connection": "close"})
    assert response.status == 200 and response.headers["connection"] == "close"
    assert connection.closed_by_peer()


# ---- HTTP, framing: requests read off a socket, bodies within limits ----

@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /time\r\n\r\n", 400),
    (b"GET /time HTTP/2.0\r\n\r\n", 505),
    (b"GET /time HTTP/1.1\r\nBad Header Line\r\n\r\n", 400),
    (b"GET /time HTTP/1.1\r\n Folded: x\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nContent-Length: 70000\r\n\r\n", 413),
    (b"POST /time HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /time HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET /time HTTP/1.1\r\n" + (b"X-A: " + b"b" * 8000 + b"\r\n") * 9 + b"\r\n", 431),
    (b"POST /time HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nTransfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"GET /time HTTP/1.1\r\nContent-Length : 0\r\n\r\n", 400),
])
def test_malformed_requests_get_json_errors_and_close(daemon, data, status):
    error_of(raw_exchange(daemon, data), status)


def test_control_characters_in_the_target_are_400(daemon):
    error_of(raw_exchange(daemon, b"GET /ti\x1bme HTTP/1.1\r\n\r\n"), 400)
    error_of(raw_exchange(daemon, b"GET /time\r HTTP/1.1\r\n\r\n"), 400)


def test_fuzzed_requests_never_take_the_daemon_down(node, start):
    """Seeded random mutations of valid requests, alone, pipelined or cut off by a reset, with
    one GPU hung: each is answered (never with a 5xx but 505 for a mangled version, or 503
    naming the hung GPU) or closed, never more."""
    import random
    daemon = start(mode="tcp")
    wait_for(lambda: daemon.threads() == IDLE_THREADS, "an idle daemon")
    node.update(delay={"nvmlDeviceGetTotalEnergyConsumption": {"0": 300}})
    hung = ask_and_leave(daemon, "/gpu/get_cumulative_energy?gpu_ids=0")
    rng = random.Random(1234)
    seeds = [b"GET /gpu/get_power?gpu_ids=0,1 HTTP/1.1\r\nHost: x\r\n\r\n",
             b"GET /gpu/get_cumulative_energy?gpu_ids=0,2 HTTP/1.1\r\nHost: x\r\n\r\n",
             b"POST /gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&block=true HTTP/1.1\r\n"
             b"Content-Length: 3\r\n\r\nabc",
             b"GET /cpu/get_cumulative_energy?cpu=true&dram=false HTTP/1.0\r\n\r\n",
             b"POST /time HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"]

    def mutated():
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(0, 6)):
            position = rng.randrange(len(data))
            action = rng.random()
            if action < 0.4:
                data[position] = rng.randrange(256)
            elif action < 0.7:
                del data[position:position + rng.randint(1, 8)]
            else:
                junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
                data[position:position] = junk
        return bytes(data)
    for round_number in range(200):
        data = b"".join(mutated() for _ in range(rng.randint(1, 3)))
        connection = daemon.connect()
        if round_number % 5 == 4:
            connection.send(data[:rng.randrange(len(data))])
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            connection.close()
            continue
        connection.send(data + b"\r\n\r\n")
        connection.sock.shutdown(socket.SHUT_WR)
        try:
            while True:
                response = connection.response()
                assert response.status < 500 or response.status == 505 or (
                    response.status == 503 and b"GPU 0 did not answer" in response.body), \
                    (data, response)
                if response.status >= 400 and response.body:
                    response_json(response)
        except (EOFError, ConnectionResetError):
            pass
        connection.close()
    assert daemon.get("/time").status == 200
    hung.close()
    wait_for(lambda: daemon.threads() == IDLE_THREADS + 1, "connection threads to end")
    assert "Traceback" not in daemon.log()


def test_request_line_longer_than_limit_without_newline_is_414(daemon):
    connection = daemon.connect()
    connection.send(b"GET /" + b"a" * 9000)
    error_of(connection.response(), 414)
    connection.close()


def test_request_bodies_are_drained(daemon):
    connection = daemon.connect()
    response = connection.request("POST", "/discover", body=b"x" * 65536)
    assert response.status == 405
    connection.send(b"POST /time HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n")
    assert connection.response().status == 405
    connection.send(b"POST /time HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    status, _ = connection.read_head()
    assert status == 100
    connection.send(b"abcd")
    assert connection.response().status == 405
    assert connection.request("GET", "/time").status == 200
    connection.close()


def test_chunked_body_over_limit_is_413(daemon):
    chunk = b"%x\r\n%s\r\n" % (40000, b"y" * 40000)
    data = b"POST /time HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n"
    error_of(raw_exchange(daemon, data), 413)


def test_absolute_form_target(daemon):
    assert daemon.get("http://localhost/time").status == 200


def test_head_ending_in_lf_cr_lf_is_answered_at_once(daemon):
    connection = daemon.connect()
    connection.send(b"GET /time HTTP/1.1\r\nHost: x\n\r\n")
    connection.sock.settimeout(2.0)
    assert connection.response().status == 200
    connection.close()


# Framing, tested in-process on RequestReader over a socket pair: (bytes the client sends,
# the requests read as (method, path, query), or the status of the error that ends them).
CHUNKED = b"POST /time HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
READER_CASES = [
    (b"GET /time HTTP/1.1\r\n\r\n", [("GET", "/time", "")]),
    (b"GET /a?b=1 HTTP/1.1\n\nGET /c HTTP/1.0\r\n\nGET /d HTTP/1.1\n\r\n",
     [("GET", "/a", "b=1"), ("GET", "/c", ""), ("GET", "/d", "")]),
    (b"\r\n\r\nGET /time HTTP/1.1\r\n\r\n", [("GET", "/time", "")]),
    (b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /y HTTP/1.1\r\n\r\n",
     [("POST", "/x", ""), ("GET", "/y", "")]),
    (b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
     [("POST", "/x", "")]),
    (CHUNKED + b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\nGET /y HTTP/1.1\r\n\r\n",
     [("POST", "/time", ""), ("GET", "/y", "")]),
    (b"GET /time HTTP/1.1\r\nX-Tab:\tvalue\t\r\n\r\n", [("GET", "/time", "")]),
    (CHUNKED + b"5\r\nhelloXX0\r\n\r\n", 400),
    (CHUNKED + b"5\r\nhello\n0\r\n\r\n", 400),
    (CHUNKED + b"zz\r\n", 400),
    (b"POST /time HTTP/1.1\r\nTransfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    (b"POST /time HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
    (b"POST /time HTTP/1.1\r\nContent-Length: 5\n\x00\r\n\r\n", 400),
    (b"GET /time HTTP/1.1\r\nHost: x\r\n Folded: y\r\n\r\n", 400),
    (b"GET /time HTTP/1.1\r\nContent-Length : 0\r\n\r\n", 400),
    (b"GET /time HTTP/1.1\r\nX\tY: 0\r\n\r\n", 400),
    (b"GET /time HTTP/1.1\r\nX-A: a\rb\r\n\r\n", 400),
    (b"GET /time HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400),
    (b"GET /time\r HTTP/1.1\r\n\r\n", 400),
    (b"GET /time HTTP/1.1 \r\n\r\n", 400),
    (b"GET /time HTTP/2.0\r\n\r\n", 505),
    (b"POST /time HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", 413),
    (CHUNKED + b"10000\r\n" + b"x" * 65536 + b"\r\n1\r\nx\r\n0\r\n\r\n", 413),
    (b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /time HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET /time HTTP/1.1\r\n" + (b"X-A: " + b"b" * 8000 + b"\r\n") * 9 + b"\r\n", 431),
]


@pytest.mark.parametrize("data, expected", READER_CASES)
def test_request_reader_framing(data, expected):
    assert read_all(data) == expected


def test_request_reader_in_pieces():
    """The same requests, fed a byte at a time, read the same."""
    data = READER_CASES[1][0] + READER_CASES[5][0]
    client, server = socket.socketpair()
    reader = zeusd.RequestReader(server)

    def send():
        for i in range(len(data)):
            client.send(data[i:i + 1])
        client.shutdown(socket.SHUT_WR)
    sender = threading.Thread(target=send)
    sender.start()
    paths = []
    with pytest.raises(zeusd.ConnectionClosed):
        while True:
            paths.append(reader.next_request().path)
    sender.join()
    assert paths == ["/a", "/c", "/d", "/time", "/y"]


@pytest.mark.slow
def test_slow_client_gets_408(slow_client):
    """Waits for what is left of the header timeout of slow_client (under way since the
    session's start)."""
    slow_client.sock.settimeout(zeusd.HEADER_TIMEOUT_S + 5)
    error_of(slow_client.response(), 408)
    assert time.monotonic() - slow_client.since > zeusd.HEADER_TIMEOUT_S - 0.5
    assert slow_client.closed_by_peer()


# ---- HTTP, connection: keep-alive, pipelining, HTTP/1.0, close, HEAD ----

def test_keep_alive_serves_many_requests_on_one_connection(daemon):
    connection = daemon.connect()
    for path in ("/time", "/discover", "/gpu/get_power", "/nope", "/cpu/get_power", "/time"):
        response = connection.request("GET", path)
        assert response.status in (200, 404)
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["content-length"]) == len(response.body)
        assert "connection" not in response.headers
    connection.close()


def test_pipelined_requests_are_answered_in_order(daemon):
    connection = daemon.connect()
    connection.send(b"GET /time HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.response().status == 200
    assert connection.response().status == 404
    connection.close()


def test_http10_clients(daemon):
    connection = daemon.connect()
    connection.send(b"GET /time HTTP/1.0\r\n\r\n")
    response = connection.response()
    assert response.status == 200 and response.headers["connection"] == "close"
    assert connection.closed_by_peer()
    connection = daemon.connect()
    connection.send(b"GET /time HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert connection.response().headers["connection"] == "keep-alive"
    connection.send(b"GET /time HTTP/1.0\r\n\r\n")
    assert connection.response().status == 200
    connection.close()


def test_connection_close_is_honoured(daemon):
    connection = daemon.connect()
    response = connection.request("GET", "/time", {"Connection": "close"})
    assert response.status == 200 and response.headers["connection"] == "close"
    assert connection.closed_by_peer()


def test_head_response_has_no_body_and_connection_stays_usable(daemon):
    connection = daemon.connect()
    assert connection.request("HEAD", "/discover").status == 405
    assert connection.request("GET", "/time").status == 200
    connection.close()


# ==== Programs: the servers, the commands that ask a daemon, the command line, main ====


# ---- Connection limits: the cap, each client's fair share ----

def test_connection_cap(start):
    daemon = start("--max-connections", "2")
    held = [served_connection(daemon), served_connection(daemon)]
    refused = daemon.connect()
    refused.send(b"GET /time HTTP/1.1\r\nHost: x\r\n\r\n")
    assert error_of(refused.response(), 503) == "Too many connections"
    assert refused.closed_by_peer()
    held.pop().close()
    wait_for(lambda: daemon.get("/time").status == 200, "a free connection slot")
    held[0].close()


@pytest.mark.slow
def test_connection_cap_holds_at_1024_and_counts_nothing_twice(start):
    raise_own_file_limit(4096)
    daemon = start("--enable", "gpu-read", "--max-connections-per-client", "1024",
                   env={"ZEUSD_LOG": "warning"})
    for _ in range(2):
        served, refused = flood(daemon, 1100)
        assert (len(served), len(refused)) == (1024, 76)
        close_all(daemon, served + refused)
    assert "Traceback" not in daemon.log()


@pytest.mark.slow
def test_connection_cap_above_1024_and_small(start):
    raise_own_file_limit(4096)
    daemon = start("--enable", "gpu-read", "--max-connections", "1500",
                   "--max-connections-per-client", "1500", env={"ZEUSD_LOG": "warning"})
    served, refused = flood(daemon, 1510)
    assert (len(served), len(refused)) == (1500, 10)
    close_all(daemon, served + refused)
    small = start("--enable", "gpu-read", "--max-connections", "3",
                  "--max-connections-per-client", "3", mode="tcp")
    for _ in range(3):
        served, refused = flood(small, 20)
        assert (len(served), len(refused)) == (3, 17)
        close_all(small, served + refused)


def test_silent_connections_beyond_the_cap_do_not_delay_the_next_answer(start):
    raise_own_file_limit(4096)
    daemon = start("--enable", "gpu-read", "--max-connections", "50",
                   "--max-connections-per-client", "50", env={"ZEUSD_LOG": "warning"})
    held = [served_connection(daemon) for _ in range(50)]
    silent = [daemon.connect() for _ in range(1000)]
    started = time.monotonic()
    late = daemon.connect()
    late.send(b"GET /time HTTP/1.1\r\nHost: x\r\n\r\n")
    assert late.response().status == 503
    assert time.monotonic() - started < 1.0
    for connection in held + silent + [late]:
        connection.close()
    wait_for(lambda: daemon.get("/time").status == 200, "a free connection slot")


def test_one_client_cannot_take_every_connection(start):
    daemon = start("--enable", "gpu-read", "--max-connections", "8", mode="tcp")
    streams = [EventStream(connect_from(daemon, "127.0.0.1"), "/gpu/stream_power")
               for _ in range(2)]
    assert all(stream.status == 200 for stream in streams)
    extra = connect_from(daemon, "127.0.0.1").request("GET", "/discover")
    assert error_of(extra, 503) == "Too many connections from this client"
    other = address_beyond_loopback()
    if other is not None:  # another address of this host is another client
        assert connect_from(daemon, other).request("GET", "/discover").status == 200
    for stream in streams:
        stream.close()
    wait_for(lambda: connect_from(daemon, "127.0.0.1").request("GET", "/time").status == 200,
             "the client's connections to be released")
    assert "--max-connections-per-client" in daemon.log()


def test_every_loopback_address_is_one_client(start):
    """127.0.0.2 … 127.0.0.7 are the same client as 127.0.0.1: one local user cannot take more
    than one share by binding other loopback addresses."""
    daemon = start("--enable", "gpu-read", "--max-connections", "40",
                   "--max-connections-per-client", "3", mode="tcp")
    streams = [EventStream(connect_from(daemon, "127.0.0.%d" % n), "/gpu/stream_power")
               for n in (1, 2, 3)]
    assert all(stream.status == 200 for stream in streams)
    for n in range(4, 8):
        extra = connect_from(daemon, "127.0.0.%d" % n).request("GET", "/discover")
        assert error_of(extra, 503) == "Too many connections from this client", n
    other = address_beyond_loopback()
    if other is not None:  # an address of this host outside 127.0.0.0/8: another client
        assert connect_from(daemon, other).request("GET", "/discover").status == 200
    for stream in streams:
        stream.close()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to connect as another uid")
def test_one_uid_cannot_take_every_connection_and_root_is_exempt(start):
    python = unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter that an unprivileged user can run")
    public = tempfile.mkdtemp(prefix="zeusd-public-")
    os.chmod(public, 0o755)
    try:
        daemon = start("--enable", "gpu-read", "--max-connections", "40",
                       "--max-connections-per-client", "30",
                       socket_name=os.path.join(public, "zeusd.sock"))
        holder = subprocess.Popen(
            [python, "-c", "import socket, sys, time\nheld = []\nfor _ in range(31):\n"
             "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); held.append(s)\n"
             "    s.sendall(b'GET /gpu/stream_power HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
             "print(repr(held[-1].recv(4096)), flush=True)\ntime.sleep(60)\n",
             daemon.socket_path], stdout=subprocess.PIPE, preexec_fn=as_nobody)
        try:
            refused = holder.stdout.readline().decode()
            assert " 503 " in refused and "Too many connections from this client" in refused
            assert daemon.get("/discover").status == 200
            held = [served_connection(daemon) for _ in range(10)]
            assert error_of(daemon.get("/discover"), 503) == "Too many connections"
            for connection in held:
                connection.close()
        finally:
            holder.kill()
            holder.wait()
    finally:
        shutil.rmtree(public, ignore_errors=True)


# ---- Servers: the socket file made safely, TCP, the file limit ----

def test_stale_socket_is_replaced(node, start):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(node.root, "zeusd.sock"))
    stale.close()
    daemon = start()
    assert daemon.get("/time").status == 200


def test_live_daemon_is_not_replaced(start):
    first = start()
    second = start(wait=False)
    assert second.wait_exit() == 1
    assert "another daemon is listening" in second.log()
    assert first.get("/time").status == 200


def test_socket_path_that_is_not_a_socket_is_left_alone(node, start):
    path = os.path.join(node.root, "zeusd.sock")
    with open(path, "w") as regular:
        regular.write("keep me")
    daemon = start(wait=False)
    assert daemon.wait_exit() == 1
    assert "is not a socket" in daemon.log()
    with open(path) as regular:
        assert regular.read() == "keep me"


def test_missing_socket_directory_exits_1(start):
    daemon = start(socket_name="missing/zeusd.sock", wait=False)
    assert daemon.wait_exit() == 1
    assert os.path.dirname(daemon.socket_path) in daemon.log()


def test_socket_mode_and_owner(start):
    args = ["--socket-permissions", "0640"]
    if IS_ROOT:
        args += ["--socket-uid", "65534", "--socket-gid", "65534"]
    daemon = start(*args)
    info = os.stat(daemon.socket_path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o640
    if IS_ROOT:
        assert (info.st_uid, info.st_gid) == (65534, 65534)


def test_the_default_socket_directory_is_made_when_missing(tmp_path):
    default = os.path.join(str(tmp_path), "run", "zeusd", "zeusd.sock")
    os.mkdir(os.path.join(str(tmp_path), "run"))
    zeusd.make_default_directory(os.path.join(str(tmp_path), "other", "zeusd.sock"), default)
    assert not os.path.exists(os.path.join(str(tmp_path), "other"))
    zeusd.make_default_directory(default, default)
    info = os.stat(os.path.dirname(default))
    assert stat.S_IMODE(info.st_mode) == 0o755 and info.st_uid == os.geteuid()
    zeusd.make_default_directory(default, default)  # already there: left as it is


@pytest.mark.skipif(not MAY_UNSHARE, reason="needs root that may unshare a mount namespace")
def test_a_daemon_first_on_a_fresh_run_leaves_run_zeusd_open(node, start):
    """A TCP daemon with gpu-control, first on a fresh /run (a tmpfs in a mount namespace of
    its own), makes /run/zeusd 0755 and its state directory /run/zeusd/state 0700, so that a
    UDS daemon's socket there stays reachable."""
    fresh_run = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs /run && exec "$@"', "sh"]
    daemon = start("--enable", "gpu-control,gpu-read", mode="tcp", prefix=fresh_run,
                   state_dir=None)
    run = "/proc/%d/root/run/zeusd" % daemon.process.pid  # /run as the daemon sees it
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(run + "/state").st_mode) == 0o700


def test_a_socket_open_to_all_behind_a_closed_directory_is_warned_about(start):
    public = tempfile.mkdtemp(prefix="zeusd-public-")
    os.chmod(public, 0o755)
    closed = os.path.join(public, "closed")
    os.mkdir(closed, 0o700)
    try:
        daemon = start("--enable", "gpu-read", socket_name=os.path.join(closed, "zeusd.sock"))
        warned = wait_for(lambda: [line for line in daemon.log().splitlines()
                                   if " WARNING " in line and closed in line],
                          "the WARNING line")
        assert len(warned) == 1 and "0700" in warned[0], warned
        for mode, path in (("666", os.path.join(public, "zeusd.sock")),
                           ("600", os.path.join(closed, "own.sock"))):
            quiet = start("--enable", "gpu-read", "--socket-permissions", mode, socket_name=path)
            assert " WARNING " not in quiet.log(), quiet.log()
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="needs root: the attacker runs as another user")
def test_socket_swapped_for_a_symlink_changes_no_other_file(node, start):
    """Another user who can write to the socket's directory replaces every socket that appears
    there with a symlink to a root-owned 0600 file; that file must keep its mode and owner."""
    shared = tempfile.mkdtemp(prefix="zeusd-race-")  # where the other user can reach it
    os.chmod(shared, 0o777)
    secret = os.path.join(node.root, "secret")
    with open(secret, "w") as secret_file:
        secret_file.write("root only\n")
    os.chmod(secret, 0o600)
    socket_path = os.path.join(shared, "zeusd.sock")
    python = unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter that an unprivileged user can run")
    racer = subprocess.Popen([python, "-c", SYMLINK_RACER, socket_path, secret],
                             preexec_fn=as_nobody, stdout=subprocess.PIPE)
    try:
        assert racer.stdout.readline() == b"ready\n"
        for _ in range(20):
            daemon = start("--enable", "gpu-read", "--socket-path", socket_path,
                           "--socket-permissions", "666", "--socket-uid", "65534", wait=False)
            wait_for(lambda: "listening on" in daemon.log() or daemon.process.poll() is not None,
                     "the daemon to listen")
            daemon.process.kill()
            daemon.process.wait()
            if os.path.lexists(socket_path):
                os.unlink(socket_path)
            info = os.stat(secret)
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, 0), "trial %d" % _
    finally:
        racer.kill()
        racer.wait()
        shutil.rmtree(shared, ignore_errors=True)


def test_two_daemons_started_at_once_on_one_path_one_serves(node, start):
    for trial in range(3):
        name = "race-%d.sock" % trial
        first, second = (start("--enable", "gpu-read", socket_name=name, wait=False)
                         for _ in range(2))
        wait_for(lambda: first.process.poll() is not None or second.process.poll() is not None,
                 "one daemon to give up")
        loser, winner = (first, second) if first.process.poll() is not None else (second, first)
        assert loser.wait_exit() == 1 and "another daemon is listening on" in loser.log()
        winner.wait_ready()
        assert winner.get("/time").status == 200
        winner.stop()


def test_busy_tcp_address_exits_1(start):
    first = start(mode="tcp")
    address = "%s:%d" % first.address
    second = start(mode="tcp", address=address, wait=False)
    assert second.wait_exit() == 1
    assert "cannot listen on " + address in second.log()


def test_tcp_serves_the_same_api_and_warns_without_auth(start):
    daemon = start(mode="tcp")
    assert "without --signing-key-path" in daemon.log()
    assert daemon.get_json("/discover")["gpu_ids"] == [0, 1, 2]
    assert sorted(daemon.get_json("/gpu/get_power")["power_mw"]) == ["0", "1", "2"]


def test_tcp_ipv6(start):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    daemon = start(mode="tcp", address="[::1]:0")
    assert daemon.address[0] == "::1"
    assert daemon.get("/time").status == 200


def test_out_of_descriptors_backs_off_and_recovers(start):
    def low_file_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
    daemon = start("--enable", "gpu-read", preexec_fn=low_file_limit)
    connections = [daemon.connect() for _ in range(60)]
    wait_for(lambda: "cannot accept connections" in daemon.log(), "the EMFILE log line")
    cpu_before = process_cpu_seconds(daemon.process.pid)
    time.sleep(1.0)  # measuring the daemon's CPU use over a second, not waiting for an event
    assert process_cpu_seconds(daemon.process.pid) - cpu_before < 0.3
    for connection in connections:
        connection.close()
    wait_for(lambda: daemon.get("/time").status == 200, "the daemon to serve again")
    log_text = daemon.log()  # one line as each run out of descriptors starts, one as it ends
    assert log_text.count("cannot accept connections") == \
        log_text.count("accepting connections again") >= 1, log_text
    assert "Traceback" not in log_text


# ---- Daemon client: finding the socket, what a server may send and how long it may take ----

def test_status_finds_the_socket_through_zeusd_sock_path(start):
    daemon = start("--enable", "gpu-read")
    status, out, err = status_cli(env={"ZEUSD_SOCK_PATH": daemon.socket_path})
    assert status == 0 and "at unix:%s" % daemon.socket_path in out
    status, out, err = status_cli("--tcp", "[::1]:9", env={"ZEUSD_SOCK_PATH": "/nonexistent"})
    assert status == 1 and err.startswith("zeusd status: cannot reach the daemon at "
                                          "http://[::1]:9: ")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run zeusd status as another user")
def test_status_names_the_mode_and_group_of_a_socket_it_may_not_open(start):
    python = unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter that an unprivileged user can run")
    with unprivileged_checkout() as (python, root, node, script):
        open_to_everyone(root)
        daemon = Daemon(node, "--enable", "gpu-read", "--socket-permissions", "660",
                        "--socket-gid", "0")
        try:
            result = subprocess.run([python, script, "status", "--socket-path",
                                     daemon.socket_path], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, preexec_fn=as_nobody, timeout=TIMEOUT)
        finally:
            daemon.stop()
    assert result.returncode == 1 and result.stderr.decode() == (
        "zeusd status: permission denied on unix:%s (mode 0660, group 'root'): ask to be added "
        "to group 'root', or have the daemon started with --socket-permissions 666\n"
        % daemon.socket_path)


@pytest.mark.parametrize("answer, fragment", [
    (lambda path: [b"HTTP/1.1 200 OK\r\nContent-Length: 2000000000\r\n\r\n{"],
     "sent a body of 2000000000 bytes; at most 1048576 are read"),
    (lambda path: [b"HTTP/1.1 200 OK\r\n"] + [0.4, b"X-Slow: 1\r\n"] * 20,
     "did not answer in time"),
    (lambda path: [b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000], "longer than 65536 bytes"),
    (lambda path: http_answer([[[]]] * 2), "something other than a JSON object"),
])
def test_status_bounds_what_a_server_may_send_and_how_long_it_may_take(answer, fragment):
    server = HostileServer(answer)
    try:
        (status, out, err), seconds = timed(status_cli, "--tcp", server.address, "--timeout",
                                            "1")
    finally:
        server.close()
    assert status == 1 and fragment in err and err.count("\n") == 1 and seconds < 3


ONE_GPU = {"gpus": [{"id": 0, "name": "H100", "cumulative_energy_available": True}], "cpus": [],
           "auth_required": False}
ODD_SHAPES = {
    "sessions as a number": {"/gpu/holds": {"0": {"uid": 1001, "user": None, "sessions": 4200}}},
    "sessions as an object": {"/gpu/holds": {"0": {"uid": 1001, "sessions": {"4200": 1}}}},
    "power_mw as a list": {"/gpu/get_power": {"power_mw": [76000]}},
    "energy as a number": {"/gpu/get_cumulative_energy": {"0": 123456}},
    "a limit as a list": {"/gpu/get_power_limit": {"0": [300000]}},
    "a GPU id outside Latin-1": {"/discover": dict(ONE_GPU, gpus=[{"id": "\u20ac"}])},
    "a GPU id that is a lone surrogate": {"/discover": dict(ONE_GPU, gpus=[{"id": "\ud800"}])},
    "GPUs that are not objects": {"/discover": dict(ONE_GPU, gpus=[0, "H100", None])},
    "CPU power as a number": {"/discover": dict(ONE_GPU, cpus=[{"id": 0, "name": "package-0"}]),
                              "/cpu/get_power": {"power_mw": {"0": 5}}},
}


@pytest.mark.parametrize("shape", sorted(ODD_SHAPES))
def test_status_answers_odd_shapes_with_one_line_not_a_traceback(shape):
    answers = {"/discover": ONE_GPU, "/gpu/get_power": {"power_mw": {"0": 76000}},
               "/gpu/get_cumulative_energy": {"0": {"energy_mj": 5}},
               "/gpu/get_power_limit": {"0": {"power_limit_mw": 300000}}, "/gpu/holds": {},
               "/cpu/get_power": {"power_mw": {"0": {"cpu_mw": 1, "dram_mw": None}}},
               "/cpu/get_cumulative_energy": {"0": {"cpu_energy_uj": 1,
                                                    "dram_energy_uj": None}}}
    answers.update(ODD_SHAPES[shape])
    server = HostileServer(lambda path: http_answer(answers.get(path.split("?")[0], {})))
    try:
        status, out, err = status_cli("--tcp", server.address)
    finally:
        server.close()
    assert (status, out) == (1, "") and err.count("\n") == 1, (status, out, err)
    assert err.startswith("zeusd status: ") and "Traceback" not in err


# ---- Status: the table, tokens, holders, no control sequences, --watch ----

def test_status_prints_the_node(node, start):
    daemon = start()
    status, out, err = status_cli("--socket-path", daemon.socket_path)
    assert status == 0 and err == ""
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in out.splitlines()[2:]}
    assert out.startswith("zeusd-py/%s at unix:%s" % (zeusd.__version__, daemon.socket_path))
    assert rows["0 NVIDIA"][-4:] == ["76.0", "123.5", "300.0", "-"]
    assert rows["1 NVIDIA"][-4:] == ["120.0", "-", "300.0", "-"]
    assert rows["0 package-0"][-2:] == ["1.0", "0.0"] and rows["1 psys"][-1] == "-"


def test_status_over_tcp_with_a_token(key_path, start):
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-read", mode="tcp")
    address = "%s:%d" % daemon.address
    status, out, _ = status_cli("--tcp", address, env={"ZEUSD_TOKEN": token(["gpu-read"])})
    assert status == 0 and "NVIDIA A40" in out and "note:" not in out
    status, out, err = status_cli("--tcp", address, env={"ZEUSD_TOKEN": ""})
    assert (status, out) == (1, "") and err == (
        "zeusd status: the daemon at http://%s requires a token: set ZEUSD_TOKEN (or pass "
        "--token)\n" % address)
    status, out, _ = status_cli("--tcp", address, env={"ZEUSD_TOKEN": gpu_token([0, 1])})
    rows = [line.split() for line in out.splitlines()[2:]]
    assert status == 0 and "note:" not in out, out
    assert [row[0] for row in rows] == ["0", "1"] and rows[0][-3] == "123.5"


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a daemon with cpu-read")
def test_status_with_a_gpu_only_token_says_once_that_it_cannot_read_cpus(key_path, start):
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-read,cpu-read", mode="tcp")
    status, out, err = status_cli("--tcp", "%s:%d" % daemon.address,
                                  env={"ZEUSD_TOKEN": token(["gpu-read"])})
    assert status == 0 and "NVIDIA A40" in out and "package-0" not in out, (out, err)
    assert "403" not in out + err
    assert len([line for line in (out + err).splitlines() if "cpu-read" in line]) == 1, out + err


def test_status_shows_who_holds_each_gpu(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, SET_0)
    status, out, _ = status_cli("--socket-path", daemon.socket_path)
    rows = {line.split()[0]: line for line in out.splitlines()[2:5]}
    assert status == 0 and "HOLDER" in out.splitlines()[1]
    import pwd
    assert rows["0"].rstrip().endswith("uid %d %s (session %d)" % (
        os.getuid(), pwd.getpwuid(os.getuid()).pw_name, client.pid))
    assert rows["1"].rstrip().endswith("-")
    client.end()


def test_status_lets_no_server_text_reach_the_terminal_as_control_sequences():
    escapes = "\x1b]52;c;ZXZpbA==\x07\x1b]0;title\x07\x1b[2J\x9b2J\u202e"

    def answer(path):
        if path == "/discover":
            return http_answer({"gpus": [{"id": 0, "name": "H100" + escapes,
                                          "cumulative_energy_available": True}],
                                "cpus": [], "auth_required": False}, server="x" + escapes)
        if path.startswith("/gpu/get_power?"):
            return http_answer({"error": "bad" + escapes}, status=500)
        return http_answer({"0": {"energy_mj": 5, "power_limit_mw": 7}})
    server = HostileServer(answer)
    try:
        status, out, err = status_cli("--tcp", server.address)
    finally:
        server.close()
    assert status == 0 and "H100?" in out and "note: " in out and "bad?" in out
    assert all(char.isprintable() or char == "\n" for char in out + err), repr(out + err)


def test_status_watch_redraws_reconnects_and_marks_what_stopped(node, start):
    node.set_gpu(0, jitter=True)
    daemon = start("--enable", "gpu-read")
    watcher = subprocess.Popen([PYTHON, ZEUSD, "status", "--socket-path", daemon.socket_path,
                                "--watch", "0.1"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, preexec_fn=ctrl_c_works)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, b"")),
                     daemon=True).start()

    def table_line(fragment, since=0):
        return wait_for(lambda: any(fragment in line for line in lines[since:]),
                        "a table line with %r" % fragment)
    try:
        table_line(b"NVIDIA A40")
        node.set_gpu(1, power_mw=42000)
        table_line(b"42.0")
        node.update(fail={"nvmlDeviceGetPowerUsage": {"1": 15}})
        seen = len(lines)
        wait_for(lambda: any(line.split()[:4] == [b"1", b"NVIDIA", b"A40", b"-"]
                             for line in lines[seen:]), "GPU 1's power marked as missing")
        node.update(fail={})
        daemon.stop()
        seen = len(lines)
        table_line(b"cannot reach the daemon", seen)
        restarted = start("--enable", "gpu-read")
        assert restarted.socket_path == daemon.socket_path
        seen = len(lines)
        table_line(b"42.0", seen)
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(TIMEOUT) == 0


# ---- Release and receipts: zeusd release, zeusd receipts, the README's epilogs ----

@pytest.mark.skipif(not IS_ROOT, reason="needs root to run clients as two other uids")
def test_zeusd_release_ends_the_callers_holds(node, start, public):
    daemon = start("--enable", "gpu-control,gpu-read", socket_name=public)
    alice = Client(public, SET_0, uid=1001)
    with unprivileged_checkout() as (python, root, _, script):
        open_to_everyone(root)

        def release(uid, *args, **env):
            result = subprocess.run([python, script, "release"] + list(args),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=as_uid(uid), timeout=TIMEOUT,
                                    env=dict(os.environ, **env))
            return result.returncode, result.stdout.decode(), result.stderr.decode()
        status, out, err = release(1002, "--socket-path", public, "--gpus", "0")
        assert (status, out) == (1, "") and err.count("\n") == 1
        assert "GPU 0 is held by uid 1001" in err
        status, out, err = release(1001, "--socket-path", os.path.join(root, "nothing.sock"))
        assert (status, out) == (1, "") and err.count("\n") == 1
        assert daemon.log().count("audit: restore") == 0
        status, out, err = release(1001, "--gpus", "0", ZEUSD_SOCK_PATH=public)
    assert status == 0 and err == "" and any("GPU 0" in line for line in out.splitlines())
    assert "restore gpu=0 power_limit_mw=300000 persistence=1 clocks=reset " \
           "reason=released: ok" in daemon.log()
    assert daemon.get_json("/gpu/holds") == {}
    alice.end()


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_the_readme_epilog_releases_a_jobs_gpus(node, start):
    """The README's Slurm epilog, run as written (its socket put in), ends a hold that a
    background session would have kept."""
    daemon = start("--enable", "gpu-control,gpu-read")
    with open(os.path.join(HERE, "README.md")) as readme:
        epilog = re.search(r"# /etc/slurm/epilog.sh .*?\n(\[ -n \"\$SLURM_JOB_GPUS.*?)\nexit 0",
                           readme.read().split("## What happens to GPU settings")[1],
                           re.S).group(1)
    client = Client(daemon.socket_path, SET_0, "POST /gpu/set_power_limit?gpu_ids=2&"
                    "power_limit_mw=200000&block=true")
    result = subprocess.run(["sh", "-c", epilog.replace("/run/zeusd/zeusd.sock",
                                                        daemon.socket_path)],
                            env=dict(os.environ, SLURM_JOB_GPUS="0,2"), timeout=TIMEOUT)
    assert result.returncode == 0 and daemon.log().count("reason=released: ok") == 2
    assert daemon.get_json("/gpu/holds") == {}
    client.end()


def test_zeusd_receipts_filters_and_shapes(node, capsys):
    """zeusd receipts' filters and shapes, run in this process (zeusd.main) except for two
    runs of the command itself; the lines on file written as the daemon writes them."""
    def receipts_here(*args):
        capsys.readouterr()
        try:
            status = zeusd.main(["receipts", "--state-dir", state_path(node)] + list(args))
        except SystemExit as exit_:
            status = exit_.code
        out, err = capsys.readouterr()
        return status, out, err

    now = int(time.time() * 1000)
    old = now - 3 * 86400 * 1000
    receipts = [a_receipt("a1", 0, "alice", "4242", now - 1000, 51234.125),
                a_receipt("a2", 2, "alice", "4242", now - 900, 48870.0),
                a_receipt("a3", 0, "alice", "4242", now - 800, 0.04),
                a_receipt("b1", 1, "bob", "99", old, 10.0),
                a_receipt("b2", 0, "bob", None, old, 7.5)]
    write_receipts(node, receipts)
    with open(state_path(node, "receipts.jsonl"), "ab") as receipts_file:
        receipts_file.write(b"not json\n[1, 2]\n")  # lines that are not receipts are skipped
    status, out, err = receipts_cli(node, "--job", "4242", "--summary")
    assert (status, out, err) == (0, "gpu_energy_j=0:51234.2,2:48870.0\n", "")
    status, out, err = receipts_here("--job", "4242", "--json")
    assert status == 0 and [json.loads(line) for line in out.splitlines()] == receipts[:3]
    status, out, _ = receipts_here("--user", "bob")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 4, out
    assert lines[0].startswith("GPU 1: restored ") and "job 99" in lines[0]
    assert lines[0].endswith(": 10.000 J") and lines[1].endswith(": 7.500 J")
    assert lines[2:] == ["total GPU 0: 7.500 J in 1 hold", "total GPU 1: 10.000 J in 1 hold"]
    assert receipts_here("--user", "1002", "--summary")[1] == "gpu_energy_j=0:7.5,1:10.0\n"
    status, out, _ = receipts_here("--since", "2h", "--json")
    assert [json.loads(line)["hold"] for line in out.splitlines()] == ["a1", "a2", "a3"]
    day = time.strftime("%Y-%m-%d", time.gmtime(old / 1000.0))
    status, out, _ = receipts_here("--since", day, "--summary")
    assert out == "gpu_energy_j=0:51241.7,1:10.0,2:48870.0\n"
    status, out, _ = receipts_here("--job", "nope")
    assert (status, out) == (0, "no receipts match\n")
    assert receipts_here("--job", "nope", "--summary")[:2] == (0, "gpu_energy_j=\n")
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    for run, since in ((receipts_cli, future), (receipts_cli, "yesterday"),
                       (lambda node, *args: receipts_here(*args), "\x1b[31m")):
        status, out, err = run(node, "--since", since)
        assert (status, out) == (2, ""), since
        assert err.count("\n") == 1 and "--since" in err and "\x1b" not in err, err
    status, out, err = receipts_here("--json", "--summary")
    assert status == 2 and err.count("\n") == 1
    status, out, err = receipts_here("--state-dir", os.path.join(node.root, "nothing"))
    assert status == 1 and out == "" and err.count("\n") == 1


def test_zeusd_receipts_streams_a_large_file(node):
    """24 MiB of receipts: the reader's memory stays below the interpreter's plus the file's."""
    line = json.dumps(a_receipt("x", 0, "alice", "4242", int(time.time() * 1000) - 5,
                                1.0)).encode()
    line = line.replace(b'"changes": []', b'"changes": [' + b", ".join(
        [b'{"t_ms": 1, "op": "set_power_limit", "power_limit_mw": 150000}'] * 150) + b"]")
    write_receipts(node, [])
    count = (24 << 20) // (len(line) + 1)
    with open(state_path(node, "receipts.jsonl"), "wb") as receipts_file:
        for _ in range(count):
            receipts_file.write(line + b"\n")
    status, out, peak = peak_kib(node, "--summary")
    assert status == 0 and out == "gpu_energy_j=0:%.1f\n" % float(count), out
    print("zeusd receipts --summary on %d MiB: VmHWM %d KiB" % (
        os.path.getsize(state_path(node, "receipts.jsonl")) >> 20, peak))
    assert peak < 48 << 10, "zeusd receipts peaked at %d KiB on a 24 MiB file" % peak


def test_zeusd_receipts_bounds_a_line_without_a_newline(node):
    """A rotated file that reads as one 32 MiB line (zeros, as a sparse or damaged file
    reads): skipped as not a receipt, without reading the line whole (an interpreter with
    zeusd loaded peaks near 35 MiB)."""
    write_receipts(node, [a_receipt("a1", 0, "alice", "4242", int(time.time() * 1000), 2.5)])
    fd = os.open(state_path(node, "receipts.jsonl.1"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.ftruncate(fd, 32 << 20)
    os.close(fd)
    status, out, peak = peak_kib(node, "--summary")
    assert status == 0 and out == "gpu_energy_j=0:2.5\n", out
    assert peak < 48 << 10, "zeusd receipts peaked at %d KiB on a 32 MiB line" % peak


@pytest.mark.skipif(not IS_ROOT, reason="needs root for cgroups and a gpu-control daemon")
def test_the_readme_epilog_puts_the_jobs_gpu_energy_into_its_job_record(node, start):
    """The epilog run as written under sh (its socket path put in), with a fake scontrol that
    records its arguments and a zeusd that runs zeusd.py on the daemon's state directory;
    the job's session leader in a Slurm job's cgroup (job_4242)."""
    epilog = readme_epilog()
    assert "scontrol update" in epilog and "--summary" in epilog
    daemon = start("--enable", "gpu-control,gpu-read")
    state = state_path(node)
    bin_dir = os.path.join(node.root, "bin")
    os.mkdir(bin_dir)
    recorded = os.path.join(node.root, "scontrol.args")
    write_script(bin_dir, "scontrol", 'printf "%%s\\n" "$@" > %s\n'
                 '[ ! -e %s.fail ]\n' % (recorded, recorded))
    write_script(bin_dir, "zeusd", 'if [ "$1" = receipts ]; then\n'
                 '    case " $* " in *" --state-dir "*) ;; *) set -- "$@" --state-dir %s ;; '
                 'esac\nfi\nexec %s %s "$@"\n' % (state, PYTHON, ZEUSD))
    script = epilog.replace("/run/zeusd/zeusd.sock", daemon.socket_path)
    env = dict(os.environ, PATH=bin_dir + ":" + os.environ.get("PATH", "/usr/bin:/bin"),
               SLURM_JOB_GPUS="0,2", SLURM_JOB_ID="4242", SLURM_JOB_USER="root")
    cgroup = make_cgroup("v2", "system.slice", "slurmstepd.scope", "job_4242", "step_0")
    try:
        job = Client(daemon.socket_path, "POST /gpu/hold?gpu_ids=0,2",
                     "POST /gpu/set_power_limit?gpu_ids=2&power_limit_mw=200000&block=true",
                     prefix=in_cgroup(cgroup))
        assert job.answers == [[200, ""], [200, ""]]
        other = Client(daemon.socket_path, "POST /gpu/hold?gpu_ids=1")  # not the job's
        node.set_gpu(0, energy_mj=123456 + 51234125)
        node.set_gpu(2, energy_mj=5000 + 48870042)
        result = subprocess.run(["sh", "-c", script], timeout=TIMEOUT, env=env,
                                stderr=subprocess.PIPE)
        assert (result.returncode, result.stderr) == (0, b"")
        with open(recorded) as arguments:
            assert arguments.read().splitlines() == [
                "update", "JobId=4242", "AdminComment=gpu_energy_j=0:51234.1,2:48870.0"]
        assert list(daemon.get_json("/gpu/holds")) == ["1"]
        assert sorted((receipt["gpu"], receipt["job"], receipt["energy_j"])
                      for receipt in receipts_on_file(node)) == [(0, "4242", 51234.125),
                                                                 (2, "4242", 48870.042)]
        # scontrol failing: said on stderr, and the epilog still exits 0 (no drained node)
        open(recorded + ".fail", "w").close()
        result = subprocess.run(["sh", "-c", script], timeout=TIMEOUT, env=env,
                                stderr=subprocess.PIPE)
        assert result.returncode == 0 and b"not in the job record" in result.stderr
        job.end()
        other.end()
    finally:
        remove_cgroup(cgroup)


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_the_readme_epilog_releases_and_records_a_job_on_a_tcp_only_node(node, key_path, start):
    """The epilog's TCP branch, run as written under sh (only the daemon's address, the token
    file and a socket path that does not exist put in): an admin token releases the GPU that
    the job's token holds, the job's energy reaches its record, and a missing token file
    fails the epilog loudly."""
    epilog = readme_epilog()
    daemon = start("--enable", "gpu-control,gpu-read", "--signing-key-path", key_path,
                   mode="tcp")
    with open(key_path, "rb") as key_file:
        key = key_file.read()
    admin = zeusd.issue_token(key, "slurm", ["gpu-control"], None, admin=True)
    job_token = zeusd.issue_token(key, "alice/4242", ["gpu-control", "gpu-read"],
                                  int(time.time()) + 3600)
    token_file = os.path.join(node.root, "epilog.token")
    with open(token_file, "w") as written:
        written.write(admin + "\n")
    bin_dir = os.path.join(node.root, "bin")
    os.mkdir(bin_dir)
    recorded = os.path.join(node.root, "scontrol.args")
    write_script(bin_dir, "scontrol", 'printf "%%s\\n" "$@" > %s\n' % recorded)
    write_script(bin_dir, "zeusd", 'if [ "$1" = receipts ]; then set -- "$@" --state-dir %s; '
                 'fi\nexec %s %s "$@"\n' % (state_path(node), PYTHON, ZEUSD))
    script = epilog.replace("/run/zeusd/zeusd.sock", os.path.join(node.root, "no.sock")).replace(
        "/etc/zeusd/epilog.token", token_file).replace("127.0.0.1:4938",
                                                       "%s:%d" % daemon.address)
    env = dict(os.environ, PATH=bin_dir + ":" + os.environ.get("PATH", "/usr/bin:/bin"),
               SLURM_JOB_GPUS="0", SLURM_JOB_ID="4242", SLURM_JOB_USER="alice")
    assert daemon.post("/gpu/hold?gpu_ids=0", token=job_token).status == 200
    node.set_gpu(0, energy_mj=node.state["gpus"][0]["energy_mj"] + 20000500)
    result = subprocess.run(["sh", "-c", script], timeout=TIMEOUT, env=env,
                            stderr=subprocess.PIPE)
    assert (result.returncode, result.stderr) == (0, b"")
    assert "reason=released: ok" in daemon.log()
    assert daemon.get_json("/gpu/holds", token=job_token) == {}
    with open(recorded) as arguments:
        assert arguments.read().splitlines() == [
            "update", "JobId=4242", "AdminComment=gpu_energy_j=0:20000.5"]
    os.remove(token_file)
    result = subprocess.run(["sh", "-c", script], timeout=TIMEOUT, env=env,
                            stderr=subprocess.PIPE)
    assert result.returncode == 1 and result.stderr


# ---- Policy check: zeusd policy check gives the daemon's message ----

def test_policy_check_gives_the_daemons_message(policed, people):
    bob, path = people["bob"], policed.policy_path
    [answer] = ask_as(policed.socket_path, bob, set_limit(0, 450))
    message = one_error(*answer, status=403)
    refused, allowed_one, group, persist, rules = policy_checks(
        [path, "--user", "zptbob", "--gpu", "0", "--power-limit", "450"],
        [path, "--user", "zptbob", "--gpu", "1", "--power-limit", "450"],
        [path, "--group", "zptml", "--gpu", "2", "--gpu-clocks", "900", "1000"],
        [path, "--user", "zptalice", "--gpu", "2", "--persistence"],
        [path])
    assert refused == (1, "refused (403): %s\n" % message, "")
    status, out, _ = allowed_one
    assert status == 0 and out.startswith("allowed: %s may set power limit" % who(bob)), out
    assert "on GPU 1 (policy: %s)" % BOB_TABLE in out and "power budget (2400 W)" in out, out
    assert group[:2] == (1, "refused (403): a member of zptml may not change GPU 2 (policy: "
                            "group.zptml allows GPUs 0, 1).\n"), group
    assert persist[:2] == (1, "refused (403): %s may not set persistence mode (policy: "
                              "user.zptalice).\n" % who(people["alice"])), persist
    status, out, _ = rules
    assert status == 0
    assert "[group.zptml] GPUs 0, 1; power limits: 200 to 400 W; locked GPU clocks: 900 to " \
           "1980 MHz; locked memory clocks: never; persistence mode: never" in out, out
    assert "a power budget of 2400 W" in out


def test_policy_check_usage_errors_exit_2(policed):
    path = policed.policy_path
    usages = [[path, "--gpu", "0"], [path, "--power-limit", "300"],
              [path, "--gpu", "0", "--power-limit", "300", "--persistence"],
              [path, "--gpu", "x", "--power-limit", "300"], []]
    for args, (status, out, err) in zip(usages, policy_checks(*usages)):
        assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, args
        assert err.startswith("zeusd policy check: error: "), err


# ---- Command line: help, usage errors, flag values ----

def test_version_and_help_at_every_level():
    status, out, _ = run_cli("--version")
    assert (status, out) == (0, zeusd.VERSION_LINE + "\n")
    assert out.startswith("zeusd %s (Python" % zeusd.__version__)
    assert run_cli("-V")[1] == out
    status, out, _ = run_cli("--help")
    assert status == 0 and "serve" in out and "token" in out
    status, out, _ = run_cli("serve", "--help")
    for flag in ("--mode", "--socket-path", "--socket-permissions", "--socket-uid", "--socket-gid",
                 "--tcp-bind-address", "--num-workers", "--gpu-power-poll-hz",
                 "--cpu-power-poll-hz", "--enable", "--signing-key-path", "--max-connections",
                 "--rapl-dir", "--max-connections-per-client", "--stream-format"):
        assert flag in out
    assert "[default: /run/zeusd/zeusd.sock]" in out and "[default: 127.0.0.1:4938]" in out
    assert "[default: per-device]" in out
    status, out, _ = run_cli("token", "issue", "--help")
    assert status == 0 and "--expires" in out and "--scope" in out


@pytest.mark.parametrize("args, flag", [
    (["--mode", "http"], "--mode"),
    (["--socket-permissions", "999"], "--socket-permissions"),
    (["--socket-permissions", "07777"], "--socket-permissions"),
    (["--gpu-power-poll-hz", "0"], "--gpu-power-poll-hz"),
    (["--cpu-power-poll-hz", "1001"], "--cpu-power-poll-hz"),
    (["--enable", "gpu-read,gpu-write"], "--enable"),
    (["--tcp-bind-address", "localhost"], "--tcp-bind-address"),
    (["--tcp-bind-address", "127.0.0.1:70000"], "--tcp-bind-address"),
    (["--max-connections", "0"], "--max-connections"),
    (["--stream-format", "per-gpu"], "--stream-format"),
    (["--bad-flag"], "--bad-flag"),
])
def test_bad_flag_values_are_one_line_usage_errors(args, flag):
    status, out, err = run_cli("serve", *args)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and flag in err
    assert "(see 'zeusd serve --help')" in err


def test_help_texts_say_what_the_flags_do():
    _, out, _ = run_cli("serve", "--help")
    assert "[default: gpu-control,gpu-read,cpu-read]" in out and "ZEUSD_LOG" in out
    assert "no effect" in out and "logical CPUs" not in out
    _, out, _ = run_cli("token", "issue", "--help")
    assert "--gpus" in out and "'all'" in out
    status, _, err = run_cli("status", "--bad")
    assert status == 2 and "(see 'zeusd status --help')" in err


def test_enable_accepts_commas_and_repeats_and_drops_duplicates(start):
    daemon = start("--enable", "gpu-read,gpu-read", "--enable", "gpu-control",
                   "--enable", "gpu-read")
    assert daemon.get_json("/discover")["enabled_api_groups"] == ["gpu-read", "gpu-control"]


def test_num_workers_is_accepted_and_logged(start):
    daemon = start("--num-workers", "4")
    assert "--num-workers 4 has no effect" in daemon.log()


# ---- Main: startup, signals, the systemd unit, token issuing ----

def test_runs_as_a_module():
    result = subprocess.run([PYTHON, "-m", "zeusd", "--version"], cwd=HERE,
                            stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert result.returncode == 0 and result.stdout.decode().startswith("zeusd ")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the daemon as an unprivileged user")
def test_root_groups_refused_without_root():
    with unprivileged_checkout() as (python, root, node, script):
        open_to_everyone(root)
        for enable, group in (("gpu-read,cpu-read", "cpu-read"), ("gpu-control", "gpu-control")):
            result = subprocess.run(
                [python, script, "serve", "--socket-path", os.path.join(root, "z.sock"),
                 "--enable", enable], env=dict(os.environ, **node.env()),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=as_nobody,
                timeout=TIMEOUT)
            assert result.returncode == 1
            message = result.stderr.decode()
            assert "'%s' requires root" % group in message and "--enable" in message
            assert not os.path.exists(os.path.join(root, "z.sock"))
            assert node.calls() == []
        daemon = Daemon(node, "--enable", "gpu-read", python=python, script=script,
                        preexec_fn=as_nobody)
        try:
            assert daemon.get_json("/discover")["gpu_ids"] == [0, 1, 2]
        finally:
            daemon.stop()


def test_startup_log_line(start):
    daemon = start()
    line = [row for row in daemon.log().splitlines() if "listening on" in row][0]
    assert daemon.socket_path in line and "GPUs: 3" in line and "CPUs: 2" in line
    assert "gpu-control,gpu-read,cpu-read" in line and "auth: off" in line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_and_removes_socket(start, sig):
    daemon = start()
    stream = daemon.stream("/gpu/stream_power")
    assert stream.next_event() is not None
    idle = daemon.connect()
    started = time.monotonic()
    daemon.process.send_signal(sig)
    assert daemon.wait_exit(timeout=5) == 0
    assert time.monotonic() - started < 2.0
    assert not os.path.exists(daemon.socket_path)
    assert stream.connection.closed_by_peer(timeout=2)
    idle.close()
    assert "shutting down" in daemon.log()


def test_sighup_without_auth_is_logged_and_ignored(start):
    daemon = start("--enable", "gpu-read")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: authentication is off" in daemon.log(), "the SIGHUP log line")
    assert daemon.process.poll() is None and os.path.exists(daemon.socket_path)
    assert daemon.get("/time").status == 200


def test_sighup_rotates_the_signing_key(key_path, start):
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-read")
    old, new = token(["gpu-read"]), token(["gpu-read"], key=b"rotated key\n")
    assert daemon.get("/auth/whoami", token=old).status == 200
    with open(key_path, "wb") as key_file:
        key_file.write(b"rotated key\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded the signing key" in daemon.log(), "the key reload")
    assert daemon.get("/auth/whoami", token=old).status == 401
    assert daemon.get("/auth/whoami", token=new).status == 200
    open(key_path, "wb").close()
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the current signing key" in daemon.log(), "the refused reload")
    assert daemon.get("/auth/whoami", token=new).status == 200
    assert daemon.process.poll() is None


def test_sigterm_during_a_slow_nvml_init_exits_at_once(node, start):
    node.update(delay={"nvmlInit": 30})
    daemon = start("--enable", "gpu-read", wait=False)
    wait_for(lambda: node.calls("nvmlInit"), "NVML initialisation to begin")
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=5) == 0
    assert time.monotonic() - started < 2.0
    assert not os.path.exists(daemon.socket_path)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start daemons with gpu-control")
def test_sigusr2_stops_the_daemon_and_leaves_its_holds_to_the_next(node, start):
    first = start("--enable", "gpu-control,gpu-read")
    living = Client(first.socket_path, SET_0)
    gone = Client(first.socket_path, "POST /gpu/set_persistence_mode?gpu_ids=1&enabled=false&"
                  "block=true")
    before = len(node.calls(*POWER_SETTERS))
    stopping = time.monotonic()
    first.process.send_signal(signal.SIGUSR2)
    assert first.wait_exit() == 0 and time.monotonic() - stopping < 3
    assert not os.path.exists(first.socket_path)
    assert "audit: restore" not in first.log() and len(node.calls(*POWER_SETTERS)) == before
    assert sorted(state_file(node)) == ["0", "1"]
    gone.end()
    second = start("--enable", "gpu-control,gpu-read")
    wait_for(lambda: "restore gpu=1 power_limit_mw=300000 persistence=1 clocks=reset "
                     "reason=owner-gone: ok" in second.log(), "the gone owner's restore")
    holds = second.get_json("/gpu/holds")
    assert list(holds) == ["0"] and holds["0"]["sessions"] == [living.pid]
    assert "audit: restore gpu=0" not in second.log()
    restored_within(second, node, living.end(), count=2)
    assert "restore gpu=0 power_limit_mw=300000 persistence=1 clocks=reset " \
           "reason=session-ended: ok" in second.log()


def test_service_unit_reloads_with_sighup():
    with open(os.path.join(HERE, "zeusd.service")) as unit:
        assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read().splitlines()


def test_service_unit_reads_the_rust_daemons_defaults_file_first():
    with open(os.path.join(HERE, "zeusd.service")) as unit:
        lines = unit.read().splitlines()
    files = [line for line in lines if line.startswith("EnvironmentFile=")]
    assert files == ["EnvironmentFile=-/etc/default/zeusd", "EnvironmentFile=-/etc/zeusd/zeusd.env"]
    assert "ExecStart=/usr/local/bin/zeusd serve $ZEUSD_ARGS" in lines
    assert "NoNewPrivileges=yes" in lines
    assert "ProtectProc=default" in lines  # other users' /proc entries: their sessions
    assert "RuntimeDirectoryMode=0755" in lines  # the socket's and state directory's mode


@pytest.mark.skipif(not IS_ROOT or not shutil.which("sudo") or not shutil.which("setpriv"),
                    reason="needs root, sudo and setpriv")
def test_sudo_needs_these_capabilities_in_the_bounding_set():
    """The README's advice for override commands that use sudo under zeusd.service: sudo needs
    no NoNewPrivileges, and CAP_SETUID, CAP_SETGID and CAP_AUDIT_WRITE in the bounding set."""
    rule = "/etc/sudoers.d/zeusd-test-%d" % os.getpid()
    with open(rule, "w") as rule_file:
        rule_file.write("nobody ALL=(root) NOPASSWD: /bin/true\n")
    os.chmod(rule, 0o440)

    def sudo(capabilities, *flags):
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all" + "".join(",+" + c for c in capabilities)] + list(flags) +
            ["sudo", "-n", "/bin/true"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=TIMEOUT)
        return result.returncode, result.stderr.decode()
    needed = ("setuid", "setgid", "audit_write")
    try:
        assert sudo(needed) == (0, "")
        for missing in ("setuid", "setgid"):
            assert sudo([c for c in needed if c != missing])[0] != 0
        assert "unable to send audit message" in sudo(["setuid", "setgid"])[1]
        assert "no new privileges" in sudo(needed, "--no-new-privs")[1]
    finally:
        os.unlink(rule)


def test_token_issue_cli(key_path):
    status, out, err = issue_cli(key_path, "--user", "alice", "--scope", "gpu-read,cpu-read",
                                 "--scope", "gpu-read", "--expires", "1h30m")
    assert status == 0 and out.endswith("\n") and out.count("\n") == 1
    claims = verify(out.strip())
    assert (claims.sub, claims.scopes) == ("alice", ("gpu-read", "cpu-read"))
    assert abs(claims.exp - (time.time() + 5400)) < 5
    status, out, _ = issue_cli(key_path, "--user", "bob", "--expires", "never")
    assert status == 0 and verify(out.strip()) == zeusd.Claims("bob", (), None)
    status, out, _ = issue_cli(key_path, "--user", "bob", "--scope", "", "--expires", "0")
    assert status == 0 and verify(out.strip()) == zeusd.Claims("bob", (), None)


@pytest.mark.parametrize("args, fragment", [
    (["--scope", "gpu-admin", "--expires", "1h"], "gpu-control, gpu-read, cpu-read"),
    (["--scope", "gpu-read", "--expires", "soon"], "never"),
    (["--scope", "gpu-read", "--expires", "1y"], "90s"),
    (["--scope", "gpu-read"], "--expires"),
])
def test_token_issue_usage_errors(key_path, args, fragment):
    status, out, err = issue_cli(key_path, "--user", "alice", *args)
    assert status == 2 and out == "" and fragment in err


def test_token_issue_key_errors(node):
    missing = os.path.join(node.root, "missing.key")
    status, out, err = issue_cli(missing, "--user", "a", "--expires", "1h")
    assert status == 1 and out == "" and missing in err
    empty = os.path.join(node.root, "empty.key")
    open(empty, "wb").close()
    status, out, err = issue_cli(empty, "--user", "a", "--expires", "1h")
    assert status == 1 and out == "" and empty in err


def test_token_issue_gpus_all_and_case_insensitive_expiry(key_path):
    status, out, err = issue_cli(key_path, "--user", "job42", "--scope", "all", "--gpus", "1, 0",
                                 "--expires", "1H")
    assert status == 0 and err == ""
    claims = verify(out.strip())
    assert claims.scopes == zeusd.API_GROUPS and claims.gpus == (0, 1)
    assert abs(claims.exp - (time.time() + 3600)) < 5
    status, out, err = issue_cli(key_path, "--user", "nobody", "--expires", "Never")
    assert status == 0 and verify(out.strip()).exp is None
    assert "grants no scope" in err and out.count("\n") == 1
    status, _, err = issue_cli(key_path, "--user", "a", "--gpus", "0,x", "--expires", "1h")
    assert status == 2 and "--gpus" in err


def test_token_issue_admin_and_what_an_admin_claim_may_be(key_path, start):
    status, out, err = issue_cli(key_path, "--user", "slurm", "--scope", "all", "--expires", "1h",
                                 "--admin")
    assert status == 0 and out.count("\n") == 1, err
    payload = json.loads(base64.urlsafe_b64decode(out.split(".")[1] + "=="))
    assert payload["admin"] is True and payload["sub"] == "slurm"
    status, plain, _ = issue_cli(key_path, "--user", "alice", "--scope", "all", "--expires", "1h")
    assert "admin" not in json.loads(base64.urlsafe_b64decode(plain.split(".")[1] + "=="))
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-read")
    assert daemon.get_json("/auth/whoami", token=out.strip())["admin"] is True
    assert "admin" not in daemon.get_json("/auth/whoami", token=plain.strip())
    for claim in ("yes", 1, [True]):
        odd = forge({"alg": "HS256", "typ": "JWT"}, {"sub": "slurm", "scopes": ["gpu-read"],
                                                     "admin": claim})
        assert error_of(daemon.get("/auth/whoami", token=odd), 401).startswith(
            "Invalid token: "), claim
    not_admin = forge({"alg": "HS256", "typ": "JWT"}, {"sub": "alice", "scopes": [],
                                                       "admin": False})
    assert daemon.get("/auth/whoami", token=not_admin).status == 200


# ---- Interoperability: the real Zeus clients (0.15, 0.16) and Prometheus against the daemon ----

@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(ZEUS_PYTHONS))
@pytest.mark.parametrize("mode", ["uds", "tcp"])
def test_zeus_client_against_the_daemon(node, start, version, mode):
    node.set_gpu(2, jitter=True)  # changing readings keep events flowing, as real GPUs do
    with RaplTicker(node, CPU_TICKS):
        daemon = start(*STREAM_FORMAT_OF[version], mode=mode)
        [out] = run_zeus_clients(version, daemon, [""])
    assert out["discovery"] == {"gpu_ids": [0, 1, 2], "cpu_ids": [0, 1], "dram": [True, False],
                                "auth": False, "read": True, "control": True}
    assert sorted(out["gpu_power"]["power_mw"]) == ["0", "1", "2"]
    assert out["gpu_power"]["power_mw"]["0"] == 76000
    assert 99000 <= out["gpu_power_2"]["power_mw"]["2"] < 100000
    assert out["gpu_energy"] == {"0": 123456, "2": 5000}
    assert out["cpu_energy"]["1"] == {"cpu_energy_uj": out["cpu_energy"]["1"]["cpu_energy_uj"],
                                      "dram_energy_uj": None}
    # the CPU figures only show that the client reads them (the arithmetic is tested under
    # Devices, CPUs): the test's RAPL ticker can fall behind and catch up on a busy machine
    assert 20000 < out["cpu_power"]["power_mw"]["0"]["cpu_mw"] < 120000
    assert abs(out["time"] - time.time()) < 60
    for name in ("set_power_limit", "set_persistence_mode", "set_gpu_locked_clocks",
                 "reset_gpu_locked_clocks", "set_mem_locked_clocks", "reset_mem_locked_clocks"):
        assert out[name] is None, (name, out[name])
    assert out["set_power_limit_bad"]["raised"] == "ZeusdError"
    assert '"errors"' in out["set_power_limit_bad"]["message"]
    if version == "0.16":
        assert out["get_persistence_mode"] == {"0": True}
        assert out["get_power_limit"] == {"0": 300000}
        assert out["get_power_limit_constraints"] == {"0": [100000, 700000]}
    reading = list(out["stream"].values())[0]
    assert reading["gpu_power_w"]["0"] == 76.0 and 99 <= reading["gpu_power_w"]["2"] < 100
    assert sorted(reading["cpu_power_w"]) == ["0", "1"]
    assert 5 < reading["cpu_power_w"]["1"]["cpu_w"] < 60
    assert out["zeusd_gpu"] == "ok"
    calls = node.calls(*POWER_SETTERS)
    for expected in (("nvmlDeviceSetPowerManagementLimit", "0", "250000"),
                     ("nvmlDeviceSetPersistenceMode", "1", "0"),
                     ("nvmlDeviceSetGpuLockedClocks", "0", "900", "1410"),
                     ("nvmlDeviceSetMemoryLockedClocks", "2", "1593", "2619"),
                     ("nvmlDeviceSetPowerManagementLimit", "1", "220000"),
                     ("nvmlDeviceSetPersistenceMode", "1", "1"),
                     ("nvmlDeviceSetGpuLockedClocks", "1", "1000", "1500"),
                     ("nvmlDeviceResetGpuLockedClocks", "1"),
                     ("nvmlDeviceSetMemoryLockedClocks", "1", "1593", "1593")):
        assert expected in calls, expected
    wait_for(lambda: ("nvmlDeviceResetMemoryLockedClocks", "1") in node.calls(),
             "the non-blocking reset")


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(ZEUS_PYTHONS))
def test_zeus_client_with_tokens(node, key_path, start, version):
    node.set_gpu(2, jitter=True)
    daemon = start("--signing-key-path", key_path, *STREAM_FORMAT_OF[version],
                   mode="tcp")
    with RaplTicker(node, CPU_TICKS):
        out, reader = run_zeus_clients(version, daemon, [token(list(zeusd.API_GROUPS)),
                                                         token(["gpu-read"])])
    assert out["discovery"]["auth"] is True and out["discovery"]["control"] is True
    assert out["gpu_power"]["power_mw"]["0"] == 76000 and out["zeusd_gpu"] == "ok"
    assert sorted(list(out["stream"].values())[0]["gpu_power_w"]) == ["0", "2"]
    assert reader["discovery"]["control"] is False
    assert reader["gpu_power"]["power_mw"]["1"] == 120000
    assert "lacks required scope 'gpu-control'" in reader["set_power_limit"]["message"]
    assert reader["zeusd_gpu"]["raised"] == "ZeusdCapabilityError"


@pytest.mark.slow
def test_the_readme_python_example_prints_power(node, key_path, start):
    """The README's PowerStreamingClient example, run as written (its address put in), under
    Zeus 0.16 against a daemon with the default stream format and a token."""
    python = ZEUS_PYTHONS["0.16"]
    if not python:
        pytest.skip("set ZEUSD_TEST_ZEUS_0_16 to a Python with zeus==0.16.0 (.ci/run does)")
    with open(os.path.join(HERE, "README.md")) as readme:
        example = re.search(r"```python\n(.*?)```", readme.read(), re.S).group(1)
    node.set_gpu(0, jitter=True)  # events keep coming, as from real GPUs, so stop() is quick
    daemon = start("--signing-key-path", key_path, "--enable", "gpu-read", mode="tcp")
    example = example.replace('host="node1", port=4938', 'host="%s", port=%d' % daemon.address)
    env = dict(os.environ, ZEUSD_TOKEN=token(["gpu-read"]))
    result = subprocess.run([python, "-c", ZEUS_WITHOUT_SKLEARN + example],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert re.search(r"gpu_power_w=\{0: 76\.[0-9]+, 1: 120\.0\}", result.stdout.decode()), \
        result.stdout


@pytest.mark.slow
def test_zeus_0_16_client_sees_the_policy_range(node, key_path, start):
    python = os.environ.get("ZEUSD_TEST_ZEUS_0_16")
    if not python:
        pytest.skip("set ZEUSD_TEST_ZEUS_0_16 to a Python with zeus==0.16.0 (.ci/run does)")
    path = write_policy(node.root, """
        [user.researcher]
        gpus = [0]
        power_limit_w = [150, 250]
        """)
    daemon = start("--signing-key-path", key_path, "--policy", path, "--no-restore",
                   mode="tcp")
    env = dict(os.environ, PYTHONPATH=node.lib, FAKE_NVML_STATE=node.state_path,
               FAKE_NVML_LOG=node.log_path)
    result = subprocess.run([python, "-c", ZEUS_WITHOUT_SKLEARN + ZEUS_POLICY_CLIENT,
                             daemon.address[0], str(daemon.address[1]),
                             token(CONTROL, sub="researcher")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    out = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert out["constraints"] == {"0": [150000, 250000], "1": [100000, 700000]}
    assert out["set_260"][0] == "ZeusdError" and "user 'researcher' may set power limits of " \
        "150 to 250 W on GPU 0 (policy: user.researcher); asked 260 W." in out["set_260"][1]
    assert out["set_200"] == "ok"
    # ZeusdNVIDIAGPU.get_power_management_limit_constraints(), what GlobalPowerLimitOptimizer
    # sweeps, asks the local NVML in Zeus 0.16, not the daemon: it sees the GPU's own range
    assert out["gpu_constraints"] == [100000, 700000]


def test_promtool_finds_nothing_to_report_in_a_scrape(node, start):
    promtool = prometheus_tool("promtool")
    daemon = start()
    daemon.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&block=true")
    daemon.get("/nope")
    body = daemon.get("/metrics").body
    result = subprocess.run([promtool, "check", "metrics"], input=body, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=30)
    assert (result.returncode, result.stdout) == (0, b""), result.stdout.decode()


@pytest.mark.slow
def test_prometheus_scrapes_the_daemon_with_and_without_tokens(node, key_path, start):
    binary = prometheus_tool("prometheus")
    daemons = {"open": start(mode="tcp"),
               "tokens": start("--signing-key-path", key_path, mode="tcp")}
    credentials = {"open": "", "tokens": "    authorization:\n      credentials: %s\n"
                   % token(["gpu-read", "cpu-read"])}
    config = os.path.join(node.root, "prometheus.yml")
    with open(config, "w") as config_file:
        config_file.write("global:\n  scrape_interval: 1s\nscrape_configs:\n")
        for job, daemon in sorted(daemons.items()):
            config_file.write("  - job_name: %s\n%s    static_configs:\n      - targets: "
                              "['127.0.0.1:%d']\n" % (job, credentials[job], daemon.address[1]))
    port = free_port()
    with RaplTicker(node, {"intel-rapl:0": (1000000, 50.0)}):
        server = subprocess.Popen(
            [binary, "--config.file", config, "--storage.tsdb.path",
             os.path.join(node.root, "tsdb"), "--web.listen-address", "127.0.0.1:%d" % port],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def query(expression):
                url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (port, quote(expression))
                try:
                    with urlopen(url, timeout=5) as answer:
                        results = json.loads(answer.read().decode())["data"]["result"]
                except OSError:
                    return None
                return float(results[0]["value"][1]) if results else None
            for job in sorted(daemons):
                energy = 'zeusd_cpu_energy_joules_total{cpu="0",domain="package",job="%s"}' % job
                wait_for(lambda: (query("count_over_time(%s[5s])" % energy) or 0) >= 5,
                         "five seconds of scrapes of %s" % job, timeout=30, every=0.1)
                assert query('zeusd_gpu_power_watts{gpu="0",job="%s"}' % job) == 76.0
                assert query('zeusd_gpu_energy_joules_total{gpu="0",job="%s"}' % job) == 123.456
                assert abs(query("rate(%s[5s])" % energy) - 50.0) < 2.5, job
                assert query('up{job="%s"}' % job) == 1.0
        finally:
            server.terminate()
            server.wait(timeout=30)


# ---- Architecture: zeusd.py's parts, sections, map and dependencies; this file mirrors them ----

PARTS = ("Ground", "Device core", "HTTP", "Programs")
SECTION_LIMIT = 350
HTTP_WORDS = re.compile(r"\bHTTP\b|\b(?:answer(?:ed|s|ing)?|status(?:es)?|reply|replies)"
                        r"(?: with)? [45][0-9][0-9]\b")


def layout_of(lines):
    """[(part or None, section, first line, last line)] from the `# ==== Part: ... ====` banners
    and `# ---- Name: job ----` headers (1-based lines; a section ends where the next header or
    banner begins), and the parts in order."""
    sections, parts, part = [], [], None
    for number, line in enumerate(lines, 1):
        banner = re.match(r"# ==== ([^:]+): .* ====$", line)
        header = re.match(r"# ---- ([^:]+): .* ----$", line)
        if (banner or header) and sections and sections[-1][3] is None:
            sections[-1][3] = number - 1
        if banner:
            part = banner.group(1)
            parts.append(part)
        elif header:
            sections.append([part, header.group(1), number, None])
    if sections and sections[-1][3] is None:
        sections[-1][3] = len(lines)
    return [tuple(section) for section in sections], parts


def module_names_read(tree, table):
    """{(line of the top-level statement, name)}: the module-level names that each top-level
    statement reads, at module level or as a global of a function, class, lambda or
    comprehension in it (symtable says which names a scope reads as globals: a local that
    shadows a module-level name is not a use)."""
    module_names = {symbol.get_name() for symbol in table.get_symbols()
                    if symbol.is_assigned() or symbol.is_imported()}
    starts = sorted(node.lineno for node in tree.body)
    statement_of = lambda line: starts[max(0, bisect.bisect_right(starts, line) - 1)]
    reads = set()

    def scopes(table):
        for child in table.get_children():
            yield child
            yield from scopes(child)
    for scope in scopes(table):
        for symbol in scope.get_symbols():
            if symbol.is_referenced() and symbol.is_global() and symbol.get_name() in module_names:
                reads.add((statement_of(scope.get_lineno()), symbol.get_name()))

    class ModuleLevel(ast.NodeVisitor):  # the top-level code outside those scopes
        def __init__(self, line):
            self.line, self.bound = line, set()

        def visit_Name(self, node):
            if isinstance(node.ctx, ast.Load) and node.id in module_names \
                    and node.id not in self.bound:
                reads.add((self.line, node.id))

        def visit_FunctionDef(self, node):  # decorators, defaults, annotations: module level
            for child in node.decorator_list + node.args.defaults + [
                    default for default in node.args.kw_defaults if default is not None]:
                self.visit(child)
        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_ClassDef(self, node):
            for child in node.decorator_list + node.bases + [k.value for k in node.keywords]:
                self.visit(child)

        def visit_Lambda(self, node):
            for child in node.args.defaults:
                self.visit(child)

        def visit_comprehension_scope(self, node):
            self.visit(node.generators[0].iter)  # the only part evaluated at module level
        visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = \
            visit_comprehension_scope
    for node in tree.body:
        ModuleLevel(node.lineno).visit(node)
    return reads


def definitions(tree):
    """{name: line of the first top-level statement that binds it at module level}."""
    first = {}

    class Binder(ast.NodeVisitor):
        def __init__(self, line):
            self.line = line

        def bind(self, name):
            first.setdefault(name, self.line)

        def visit_Name(self, node):
            if isinstance(node.ctx, ast.Store):
                self.bind(node.id)

        def visit_FunctionDef(self, node):  # its body binds its own names
            self.bind(node.name)
        visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

        def visit_Import(self, node):
            for alias in node.names:
                self.bind((alias.asname or alias.name).split(".")[0])
        visit_ImportFrom = visit_Import

        def visit_Lambda(self, node):
            pass
        visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_Lambda
    for node in tree.body:
        Binder(node.lineno).visit(node)
    return first


def architecture_problems(text):
    """What is wrong with zeusd.py's layout, given its text: one line per problem."""
    lines = text.splitlines()
    sections, parts = layout_of(lines)
    problems = []
    if parts != list(PARTS):
        problems.append("parts %s, expected %s" % (parts, list(PARTS)))
    for part, name, first, last in sections:
        if part is None:
            problems.append("section %s (line %d) is under no part banner" % (name, first))
        if last - first + 1 > SECTION_LIMIT:
            problems.append("section %s has %d lines, over %d" % (name, last - first + 1,
                                                                     SECTION_LIMIT))
    tree = ast.parse(text)
    doc = ast.get_docstring(tree, clean=False).splitlines()
    entries = [line for line in doc if re.match(r"  \S", line)]
    columns = collections.Counter(match.end() for match in (
        re.match(r"  \S.*?  +(?=\S)", line) for line in entries) if match)
    column = columns.most_common(1)[0][0] if columns else 2
    mapped = [line[2:column].rstrip() for line in entries]
    named = [name for _, name, _, _ in sections]
    if mapped != named:
        at = next((i for i, pair in enumerate(zip(mapped, named)) if pair[0] != pair[1]),
                  min(len(mapped), len(named)))
        problems.append("the docstring's map, entry %d: %r; the headers: %r" % (
            at + 1, mapped[at:at + 1], named[at:at + 1]))
    starts = [first for _, _, first, _ in sections]
    section_at = lambda line: bisect.bisect_right(starts, line) - 1  # -1: before the first section
    defined = {name: section_at(line) for name, line in definitions(tree).items()}
    for line, name in sorted(module_names_read(tree, symtable.symtable(text, "zeusd.py", "exec"))):
        user, home = section_at(line), defined.get(name, -1)
        if user >= 0 and home > user:
            problems.append("%s (line %d) uses %s of %s, a later section" % (
                sections[user][1], line, name, sections[home][1]))
        if user >= 0 and home >= 0 and sections[user][0] == "Device core" \
                and sections[home][0] in ("HTTP", "Programs"):
            problems.append("the device core's %s (line %d) uses %s of %s (%s)" % (
                sections[user][1], line, name, sections[home][1], sections[home][0]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and HTTP_WORDS.search(node.value):
            section = sections[section_at(node.lineno)] if section_at(node.lineno) >= 0 else None
            if section and section[0] == "Device core":
                problems.append("the device core's %s has an HTTP word at line %d: %r" % (
                    section[1], node.lineno, HTTP_WORDS.search(node.value).group(0)))
    return problems


def zeusd_text():
    with open(ZEUSD) as source:
        return source.read()


def test_zeusd_keeps_its_parts_sections_map_and_dependencies():
    """Parts in order with every section under one; no section over 350 lines; the module
    docstring's map names every section as its header does, in order; no module-level name
    used in a section before the section that defines it; the device core uses nothing of the
    HTTP and Programs parts, and says no HTTP words (HTTP, or a 4xx/5xx status after
    "answered", "status" or "reply") in its strings."""
    assert architecture_problems(zeusd_text()) == []


def planted(text, before, after, count=1):
    assert text.count(before) >= 1, before
    return text.replace(before, after, count)


def section_header(text, name):
    return re.search(r"^# ---- %s: .* ----$" % re.escape(name), text, re.M).group(0)


PLANTS = {  # a violation of each rule, planted in a copy of zeusd.py: (plant, what it says)
    "a section over 350 lines": (lambda text: planted(
        text, section_header(text, "Node"), section_header(text, "Node") + "\n#" * 351),
        "section Node has"),
    "a section before the first part": (lambda text: planted(
        text, "\n# ==== Ground:", "\n# ---- Stray: before the parts ----\n\n# ==== Ground:"),
        "section Stray (line"),
    "parts out of order": (lambda text: planted(planted(
        text, "\n# ==== HTTP:", "\n# ==== Swapped:"), "\n# ==== Programs:", "\n# ==== HTTP:"),
        "parts ['Ground', 'Device core', 'Swapped', 'HTTP']"),
    "a header renamed": (lambda text: planted(
        text, "\n# ---- Holds watcher:", "\n# ---- Holds watch:"), "the docstring's map, entry"),
    "two map lines swapped": (lambda text: planted(planted(planted(
        text, "\n  Receipts ", "\n  @@ "), "\n  Restores ", "\n  Receipts "), "\n  @@ ",
        "\n  Restores "), "the docstring's map, entry"),
    "a name used before its section": (lambda text: planted(
        text, section_header(text, "Files"), section_header(text, "Files") +
        "\n\ndef early():\n    return Node\n"), "Files (line"),
    "the device core using the HTTP part": (lambda text: planted(
        text, section_header(text, "Sampling"), section_header(text, "Sampling") +
        "\n\ndef reply_of(error):\n    return HttpError(503, str(error))\n"),
        "the device core's Sampling (line"),
    "an HTTP status in the device core": (lambda text: planted(
        text, section_header(text, "GPU control"), section_header(text, "GPU control") +
        '\nx = "answered 503"\n'), "HTTP word at line"),
}


@pytest.mark.parametrize("violation", sorted(PLANTS))
def test_the_architecture_check_catches_each_violation(violation):
    plant, fragment = PLANTS[violation]
    problems = architecture_problems(plant(zeusd_text()))
    assert any(fragment in problem for problem in problems), problems


def test_a_local_that_shadows_a_later_name_is_not_a_use():
    text = planted(zeusd_text(), section_header(zeusd_text(), "Files"),
                   section_header(zeusd_text(), "Files") + "\n\ndef shadows(Node=None):\n"
                   "    Metrics = [Reply for Reply in ()]\n    return Node, Metrics\n")
    assert architecture_problems(text) == []


def test_this_file_mirrors_zeusd_py():
    """This file's part banners are zeusd.py's, in order; its sections are named as zeusd.py's
    and come in the same order (one may be absent), then Interoperability and Architecture."""
    with open(os.path.abspath(__file__)) as this_file:
        ours, our_parts = layout_of(this_file.read().splitlines())
    theirs, their_parts = layout_of(zeusd_text().splitlines())
    assert our_parts == ["Helpers"] + their_parts
    order = [(part, name) for part, name, _, _ in theirs] + [
        ("Programs", "Interoperability"), ("Programs", "Architecture")]
    mirrored = [(part, name) for part, name, _, _ in ours]
    assert [pair for pair in mirrored if pair not in order] == []
    assert mirrored == sorted(mirrored, key=order.index)
