"""Tests for zeusd: the real daemon as a subprocess, with simulated devices.

The daemon runs under $ZEUSD_TEST_PYTHON (default: this interpreter) with a fake `pynvml`
module (FAKE_PYNVML below, driven by a JSON state file and writing a call log) first on its
PYTHONPATH, and a RAPL tree in a temporary directory passed with --rapl-dir. Pure parts (JWT,
durations, wraparound, query parsing) are also tested in-process.
"""

import base64
import collections
import contextlib
import hashlib
import hmac
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from urllib.parse import quote
from urllib.request import urlopen

import pytest

import zeusd

HERE = os.path.dirname(os.path.abspath(__file__))
ZEUSD = os.path.join(HERE, "zeusd.py")
PYTHON = os.environ.get("ZEUSD_TEST_PYTHON") or sys.executable
TIMEOUT = 10.0
IS_ROOT = os.geteuid() == 0
MAY_UNSHARE = IS_ROOT and shutil.which("unshare") is not None and subprocess.call(
    ["unshare", "--mount", "--pid", "--fork", "true"], stderr=subprocess.DEVNULL) == 0

FAKE_PYNVML = r'''
"""A fake pynvml: GPUs from the JSON file $FAKE_NVML_STATE, one line per call in $FAKE_NVML_LOG."""
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


def wait_for(predicate, what, timeout=TIMEOUT):
    """Poll predicate until it returns something true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.005)


# ---- Simulated node: fake NVML state and call log, RAPL tree ----

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


# ---- The daemon under test, and an HTTP/1.1 client that speaks raw bytes ----

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
        command = options.get("prefix", []) + [
                   options.get("python", PYTHON), options.get("script", ZEUSD), "serve",
                   "--mode", self.mode, "--rapl-dir", node.rapl]
        state_dir = options.get("state_dir", os.path.join(node.root, "state"))
        if "--state-dir" not in args and "--no-restore" not in args and state_dir is not None:
            command += ["--state-dir", state_dir]  # state_dir=None: the daemon's default
        if self.mode == "uds":
            command += ["--socket-path", self.socket_path]
        else:
            command += ["--tcp-bind-address", options.get("address", "127.0.0.1:0")]
        command += list(args)
        env = dict(os.environ, **node.env())
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


@pytest.fixture(scope="module")
def shared_node():
    root = tempfile.mkdtemp(prefix="zeusd-test-")
    yield FakeNode(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(shared_node):
    """One daemon with every group, shared by tests that change nothing on the node.

    It also holds a client that sends half a request at once, so that the 10 s header timeout
    (test_slow_client_gets_408, last in this file) runs out while the other tests run.
    """
    started = Daemon(shared_node)
    started.slow_client = started.connect()
    started.slow_client.send(b"GET /time HTTP/1.1\r\nHost: x\r\n")
    started.slow_client_since = time.monotonic()
    yield started
    started.stop()


def run_cli(*args, **options):
    """Run zeusd.py with arguments; (exit status, stdout, stderr)."""
    env = dict(os.environ, **options.get("env", {}))
    result = subprocess.run([PYTHON, ZEUSD] + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            timeout=TIMEOUT, cwd=options.get("cwd"))
    return result.returncode, result.stdout.decode(), result.stderr.decode()


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


def ask_and_leave(daemon, path, method="GET"):
    connection = daemon.connect()
    connection.send(("%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method, path)).encode())
    return connection


# ---- First: a daemon with a hung GPU, and one stopping while a restore hangs: their bounded
# waits run out while the other tests run ----

@pytest.fixture(scope="module")
def hung():
    """A daemon whose GPU 0 never answers an energy read or a power limit change, with one
    client waiting on each since the start of this file (their bounded waits, 5 s and 10 s,
    run out while the other tests run: test_a_hung_gpu_answers_within_the_limits, last)."""
    root = tempfile.mkdtemp(prefix="zeusd-hung-")
    node = FakeNode(root)
    daemon = Daemon(node, "--no-restore")
    node.update(delay={"nvmlDeviceGetTotalEnergyConsumption": {"0": 300},
                       "nvmlDeviceSetPowerManagementLimit": {"0": 300}})

    def patient(method, path):
        connection = daemon.connect()
        connection.sock.settimeout(30)
        return connection.request(method, path)
    daemon.energy = in_background(patient, "GET", "/gpu/get_cumulative_energy?gpu_ids=0")
    daemon.setter = in_background(patient, "POST", "/gpu/set_power_limit?gpu_ids=0&"
                                                   "power_limit_mw=200000&block=true")
    yield node, daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_a_hung_gpu_ties_up_one_thread_per_call_however_many_clients_ask(hung):
    node, daemon = hung
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


@pytest.fixture(scope="module")
def stopping():
    """A daemon stopped with SIGTERM since the start of this file while a restore hangs (GPU
    0's power limit setter does not answer for 30 s): it waits the restore's 10 s bound while
    the other tests run (test_sigterm_while_a_restore_hangs_waits_its_bound_and_leaves_the_hold,
    last). Before the signal, uid 1002 tried to change the GPU whose restore hangs."""
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


def test_a_gpu_whose_restore_hangs_is_409_to_other_uids(stopping):
    node, daemon = stopping
    assert daemon.answers[0] == [200, ""]
    assert one_error(*daemon.answers[1], status=409).startswith("GPU 0 is being restored")


# ---- Command line ----

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


def test_runs_as_a_module():
    result = subprocess.run([PYTHON, "-m", "zeusd", "--version"], cwd=HERE,
                            stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert result.returncode == 0 and result.stdout.decode().startswith("zeusd ")


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


# ---- Main: startup, signals, the socket, the systemd unit ----

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


def test_only_the_needed_devices_are_initialised(node, start):
    daemon = start("--enable", "cpu-read")
    discover = daemon.get_json("/discover")
    assert discover["gpu_ids"] == [] and discover["gpus"] == [] and discover["cpu_ids"] == [0, 1]
    assert node.calls() == []
    daemon.stop()
    daemon = start("--enable", "gpu-read")
    discover = daemon.get_json("/discover")
    assert discover["cpu_ids"] == [] and discover["cpus"] == [] and discover["gpu_ids"] == [0, 1, 2]


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


def test_the_state_directory_defaults_to_run_zeusd_state():
    assert zeusd.build_parser().parse_args(["serve"]).state_dir == "/run/zeusd/state"
    status, out, _ = run_cli("serve", "--help")
    assert status == 0 and "[default: /run/zeusd/state]" in out


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


def test_num_workers_is_accepted_and_logged(start):
    daemon = start("--num-workers", "4")
    assert "--num-workers 4 has no effect" in daemon.log()


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


# ---- HTTP, wire: framing, limits, keep-alive; servers: the connection cap ----

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


def test_head_response_has_no_body_and_connection_stays_usable(daemon):
    connection = daemon.connect()
    assert connection.request("HEAD", "/discover").status == 405
    assert connection.request("GET", "/time").status == 200
    connection.close()


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


def test_huge_numbers_are_400_not_500(daemon):
    digits = "9" * 5000
    assert "'power_limit_mw'" in error_of(daemon.post(
        "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=%s&block=true" % digits), 400)
    assert "'gpu_ids'" in error_of(daemon.get("/gpu/get_power?gpu_ids=" + digits), 400)
    data = ("POST /time HTTP/1.1\r\nContent-Length: %s\r\n\r\n" % digits).encode()
    error_of(raw_exchange(daemon, data), 400)


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


def served_connection(daemon):
    """A connection that the daemon serves (a closing one may still count for a moment)."""
    def attempt():
        connection = daemon.connect()
        if connection.request("GET", "/time").status == 200:
            return connection
        connection.close()
    return wait_for(attempt, "a connection slot")


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


def raise_own_file_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip("needs %d open files; the hard limit is %d" % (wanted, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


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


def test_connection_cap_holds_at_1024_and_counts_nothing_twice(start):
    raise_own_file_limit(4096)
    daemon = start("--enable", "gpu-read", "--max-connections-per-client", "1024",
                   env={"ZEUSD_LOG": "warning"})
    for _ in range(2):
        served, refused = flood(daemon, 1100)
        assert (len(served), len(refused)) == (1024, 76)
        close_all(daemon, served + refused)
    assert "Traceback" not in daemon.log()


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
    log_text = daemon.log()
    assert log_text.count("cannot accept connections") == 1
    assert "accepting connections again" in log_text and "Traceback" not in log_text


def process_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as stat_file:
        fields = stat_file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- HTTP, query parameters ----

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


# ---- HTTP, API: the endpoints every daemon serves ----

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


# ---- GPU control ----

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


# ---- GPUs: the gpu-read endpoints ----

def test_gpu_power_uses_instant_power_with_fallback(daemon):
    body = daemon.get_json("/gpu/get_power")
    assert body["power_mw"] == {"0": 76000, "1": 120000, "2": 99000}
    assert abs(body["timestamp_ms"] - time.time() * 1000) < 2000
    assert daemon.get_json("/gpu/get_power?gpu_ids=1")["power_mw"] == {"1": 120000}


def test_gpu_power_is_fresh(node, start):
    daemon = start("--gpu-power-poll-hz", "20")
    assert daemon.get_json("/gpu/get_power")["power_mw"]["0"] == 76000
    node.set_gpu(0, instant_mw=81000)
    wait_for(lambda: daemon.get_json("/gpu/get_power")["power_mw"]["0"] == 81000,
             "a fresh reading", timeout=1.0)


def test_unknown_gpu_ids_on_power(daemon):
    message = error_of(daemon.get("/gpu/get_power?gpu_ids=0,7,9"), 400)
    assert message == "Unknown GPU indices: [7, 9]. Available: [0, 1, 2]"
    message = error_of(daemon.get("/gpu/stream_power?gpu_ids=5"), 400)
    assert message == "Unknown GPU indices: [5]. Available: [0, 1, 2]"


def test_gpu_cumulative_energy(daemon):
    assert daemon.get_json("/gpu/get_cumulative_energy?gpu_ids=2,0") == {
        "2": {"energy_mj": 5000}, "0": {"energy_mj": 123456}}
    response = daemon.get("/gpu/get_cumulative_energy")
    assert response.status == 400
    errors = response_json(response)["errors"]
    assert list(errors) == ["1"] and "cumulative energy" in errors["1"]
    assert error_of(daemon.get("/gpu/get_cumulative_energy?gpu_ids=7"), 400) == \
        "GPU index 7 does not exist."


def test_gpu_energy_nvml_error_is_mapped(node, start):
    node.update(fail={"nvmlDeviceGetTotalEnergyConsumption": {"0": 15}})
    daemon = start()
    assert daemon.get_json("/discover")["gpus"][0]["cumulative_energy_available"] is False
    node.update(fail={"nvmlDeviceGetPowerManagementLimit": {"2": 4}})
    response = daemon.get("/gpu/get_power_limit")
    assert response.status == 403 and list(response_json(response)["errors"]) == ["2"]


def test_superset_gpu_reads(daemon):
    assert daemon.get_json("/gpu/get_power_limit?gpu_ids=0") == {"0": {"power_limit_mw": 300000}}
    assert daemon.get_json("/gpu/get_power_limit_constraints?gpu_ids=1") == {
        "1": {"min_power_limit_mw": 100000, "max_power_limit_mw": 700000}}
    assert daemon.get_json("/gpu/get_persistence_mode") == {
        "0": {"enabled": True}, "1": {"enabled": True}, "2": {"enabled": True}}


# ---- CPUs: RAPL and the cpu-read endpoints ----

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


def test_unknown_cpu_ids_on_power(daemon):
    assert error_of(daemon.get("/cpu/get_power?cpu_ids=3"), 400) == \
        "Unknown CPU indices: [3]. Available: [0, 1]"
    assert error_of(daemon.get("/cpu/stream_power?cpu_ids=0,4"), 400) == \
        "Unknown CPU indices: [4]. Available: [0, 1]"


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


def test_cpu_power_from_measured_energy_deltas(node, start):
    daemon = start("--stream-format", "all-devices", "--cpu-power-poll-hz", "10")
    watts = {"intel-rapl:0": (1000000, 85.0), "intel-rapl:0/intel-rapl:0:0": (5000, 12.0),
             "intel-rapl:1": (7, 40.0)}
    with RaplTicker(node, watts):
        body = daemon.get_json("/cpu/get_power")
        assert set(body["power_mw"]) == {"0", "1"}
        assert body["power_mw"]["1"]["dram_mw"] is None
        assert abs(body["power_mw"]["0"]["cpu_mw"] - 85000) < 85000 * 0.1
        assert abs(body["power_mw"]["0"]["dram_mw"] - 12000) < 12000 * 0.1
        stream = daemon.stream("/cpu/stream_power?cpu_ids=1")
        event = stream.next_event(timeout=1.0)
        assert list(event["power_mw"]) == ["1"]
        assert abs(event["power_mw"]["1"]["cpu_mw"] - 40000) < 40000 * 0.1
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


# ---- HTTP, API: groups that are not enabled ----

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


# ---- Sampling, and HTTP streams ----

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


def happens_within(predicate, seconds):
    """Whether predicate becomes true within seconds (to show that something does not)."""
    try:
        wait_for(predicate, "something", timeout=seconds)
        return True
    except AssertionError:
        return False


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


def count_events(stream, seconds):
    """Per-device events received within seconds: {gpu_id: count}."""
    counts = collections.Counter()
    deadline = time.monotonic() + seconds
    while True:
        event = stream.next_event(timeout=max(0.0, deadline - time.monotonic()))
        if event is None:
            return counts
        counts[event["gpu_id"]] += 1


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
        events = {}
        while len(events) < 2:
            event = cpu_stream.next_event()
            events[event["cpu_id"]] = event
        assert sorted(events[0]) == ["cpu_id", "cpu_mw", "dram_mw", "timestamp_ms"]
        assert events[1]["dram_mw"] is None and 15000 < events[1]["cpu_mw"] < 25000
        cpu_stream.close()


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


def gpu_sample(values, errors=None, timestamp_ms=1000):
    return zeusd.Sample(time.monotonic(), timestamp_ms, values, errors or {})


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


# ---- GPU command overrides, and their TOML subset ----

TOML_DOCUMENTS = [
    '[set_power_limit]\ncommands = ["sudo /usr/local/bin/set_powercap.sh -value {power_limit_w} '
    '-gpu {gpu_id}"]\nerror_pattern = "(?i)error|fail|cannot|unable|not supported"\n'
    'timeout_s = 30\n',
    "# comment\n\n[reset_locked_clocks]  # trailing comment\ncommands = [\n  'a b',  # one\n"
    "  \"c \\\"d\\\" \\\\ \\t \\u00e9 \\U0001F600\",\n]\ntimeout_s = +1_000\n",
    "[a]\nx = true\ny = false\nz = [1, 'two', [3]]\nw = []\n[b-c_d]\nk = -0\n",
    "[t]\r\nk = 'v'\r\n",
]
TOML_ERRORS = [
    "k = 1\n", "[a]\nk = 1\nk = 2\n", "[a]\n[a]\n", "[a]\nk = \"open\n", "[a]\nk = 1.5\n",
    "[a]\nk = 01\n", "[a]\nk = 1 2\n", "[a]\nk = [1 2]\n", "[a]\nk = \"\\q\"\n",
    "[a]\nk = '''x'''\n", "[a]\n\"q\" = 1\n", "[a]\nk = \"\\ud800\"\n", "[a]\nk = 1__0\n",
    "[a]\nk = 'a\x01'\n", "[a]\nk = \"x\" # \x00\n", "[a]\nk = 1_\n", "[a]\nk = tru\n",
]


@pytest.mark.parametrize("text", TOML_DOCUMENTS)
def test_toml_subset_reads_as_tomllib_does(text):
    parsed = zeusd.parse_toml(text)
    try:
        import tomllib
    except ImportError:
        pytest.skip("tomllib (Python 3.11+) is not here to compare with")
    assert parsed == tomllib.loads(text)


@pytest.mark.parametrize("text", TOML_ERRORS)
def test_toml_subset_refuses_what_it_does_not_read(text):
    with pytest.raises(ValueError, match="line [0-9]+: "):
        zeusd.parse_toml(text)


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


# ---- HTTP, metrics ----

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
    samples = scrape(daemon)
    assert series(samples, "zeusd_http_requests_total", path="other", status=404) == 1
    assert series(samples, "zeusd_stream_subscribers", kind="cpu") == 1
    stream.close()


def daemon_python_version():
    return subprocess.run([PYTHON, "-c", "import sys; print(sys.version.split()[0])"],
                          stdout=subprocess.PIPE).stdout.decode().strip()


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


def prometheus_tool(name):
    directory = os.environ.get("ZEUSD_TEST_PROMETHEUS_DIR")
    path = os.path.join(directory, name) if directory else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        pytest.skip("no %s: set ZEUSD_TEST_PROMETHEUS_DIR to a directory holding it (.ci/run "
                    "unpacks Debian's prometheus package there)" % name)
    return path


def test_promtool_finds_nothing_to_report_in_a_scrape(node, start):
    promtool = prometheus_tool("promtool")
    daemon = start()
    daemon.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=200000&block=true")
    daemon.get("/nope")
    body = daemon.get("/metrics").body
    result = subprocess.run([promtool, "check", "metrics"], input=body, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=30)
    assert (result.returncode, result.stdout) == (0, b""), result.stdout.decode()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
                         "five seconds of scrapes of %s" % job, timeout=30)
                assert query('zeusd_gpu_power_watts{gpu="0",job="%s"}' % job) == 76.0
                assert query('zeusd_gpu_energy_joules_total{gpu="0",job="%s"}' % job) == 123.456
                assert abs(query("rate(%s[5s])" % energy) - 50.0) < 2.5, job
                assert query('up{job="%s"}' % job) == 1.0
        finally:
            server.terminate()
            server.wait(timeout=30)


# ---- Status: zeusd status ----

def status_cli(*args, **options):
    return run_cli("status", *args, **options)


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


def ctrl_c_works():
    """Give a child the default SIGINT (a shell that runs the tests in the background ignores
    it, and Python then installs no KeyboardInterrupt for ^C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


# ---- Logging ----

def test_request_log_lines_and_level(node, key_path, start):
    daemon = start("--enable", "gpu-read", env={"ZEUSD_LOG": "debug"})
    caller = "uid=%d pid=%d" % (os.getuid(), os.getpid())
    daemon.get("/gpu/get_power?gpu_ids=0")
    daemon.get("/gpu/get_power?gpu_ids=9")
    raw_exchange(daemon, b"BAD\r\n\r\n")
    wait_for(lambda: " - - 400: " in daemon.log(), "the request lines")
    log_text = daemon.log()
    assert " INFO %s GET /gpu/get_power?gpu_ids=0 200 " % caller in log_text
    assert " INFO %s GET /gpu/get_power?gpu_ids=9 400 " % caller in log_text
    assert "ms: Unknown GPU indices: [9]. Available: [0, 1, 2]" in log_text
    assert " INFO %s - - 400: Malformed request line." % caller in log_text
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


# ---- Unit tests of the pure parts ----

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


def test_parse_ids_and_values():
    assert zeusd.parse_ids("gpu_ids", "3, 1 ,3,0") == (3, 1, 0)
    for bad in ("", "1,", ",1", "1 2", "x", "1.0", "+1", "٣"):
        with pytest.raises(zeusd.HttpError):
            zeusd.parse_ids("gpu_ids", bad)
    assert zeusd.parse_u32("p", "4294967295") == 4294967295
    assert zeusd.parse_bool("b", "True") is True


def rapl_zone(tmp_path, start_uj, range_uj=1000):
    """A zone directory with a counter at start_uj, and its RaplCounter."""
    zone = tmp_path / "zone"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("%d\n" % range_uj)
    (zone / "energy_uj").write_text("%d\n" % start_uj)
    return zone, zeusd.RaplCounter(str(zone))


def test_the_default_socket_directory_is_made_when_missing(tmp_path):
    default = os.path.join(str(tmp_path), "run", "zeusd", "zeusd.sock")
    os.mkdir(os.path.join(str(tmp_path), "run"))
    zeusd.make_default_directory(os.path.join(str(tmp_path), "other", "zeusd.sock"), default)
    assert not os.path.exists(os.path.join(str(tmp_path), "other"))
    zeusd.make_default_directory(default, default)
    info = os.stat(os.path.dirname(default))
    assert stat.S_IMODE(info.st_mode) == 0o755 and info.st_uid == os.geteuid()
    zeusd.make_default_directory(default, default)  # already there: left as it is


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


# ---- Authentication ----

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


def forge_raw(header, payload, key=KEY):
    """A token from raw header and payload bytes, signed HS256 with key."""
    signing_input = b64(header) + "." + b64(payload)
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


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


@pytest.fixture
def key_path(node):
    path = os.path.join(node.root, "signing.key")
    with open(path, "wb") as key_file:
        key_file.write(KEY)
    os.chmod(path, 0o600)
    return path


def issue_cli(key_path, *args):
    return run_cli("token", "issue", "--signing-key-path", key_path, *args)


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


def test_serve_key_errors_and_permission_warning(node, key_path, start):
    daemon = start("--signing-key-path", os.path.join(node.root, "nope.key"), wait=False)
    assert daemon.wait_exit() == 1
    assert "nope.key" in daemon.log()
    assert not os.path.exists(daemon.socket_path)
    os.chmod(key_path, 0o640)
    daemon = start("--signing-key-path", key_path)
    assert "readable by group or others" in daemon.log()


@pytest.fixture
def auth_daemon(key_path, start):
    return start("--signing-key-path", key_path, "--enable", "gpu-read,cpu-read,gpu-control")


WWW_AUTHENTICATE = 'Bearer realm="zeusd"'


def test_open_endpoints_need_no_token(auth_daemon):
    assert auth_daemon.get_json("/discover")["auth_required"] is True
    assert auth_daemon.get("/time").status == 200
    assert auth_daemon.get("/time", token="garbage").status == 200


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


@pytest.mark.parametrize("gpus", ["0", [0, "1"], [-1], [True], [2 ** 32], {"0": 1}])
def test_bad_gpus_claims_are_refused(gpus):
    with pytest.raises(zeusd.HttpError) as refused:
        verify(forge({"alg": "HS256"}, {"sub": "a", "scopes": [], "gpus": gpus}))
    assert "'gpus'" in refused.value.message


def gpu_token(gpus, scopes=("gpu-read", "gpu-control")):
    claims = {"sub": "job42", "scopes": list(scopes), "gpus": gpus}
    return forge({"alg": "HS256", "typ": "JWT"}, claims)


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


# ---- Bounded waits, fair share, bounded overrides, logs under volume, small files ----

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

    def survivors():
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                    if b"41.5" in cmdline.read():
                        found.append(entry)
            except OSError:
                pass
        return found
    assert survivors() == []


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


# ---- Holds: owners, conflicts, restores, the state file ----

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


def as_uid(uid):
    def become():
        os.setgid(uid)
        os.setgroups([])
        os.setuid(uid)
    return become


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


@pytest.fixture
def public(tmp_path):
    """A socket path in a directory every user can reach, for clients of other uids."""
    directory = tempfile.mkdtemp(prefix="zeusd-public-")
    os.chmod(directory, 0o755)
    yield os.path.join(directory, "zeusd.sock")
    shutil.rmtree(directory, ignore_errors=True)


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


def test_a_leader_that_exits_while_its_children_live_ends_the_session(node, start):
    daemon = start("--enable", "gpu-control,gpu-read")
    client = Client(daemon.socket_path, SET_0, mode="leave-a-child")
    assert client.answers == [[200, ""]]
    took = restored_within(daemon, node, time.monotonic())
    assert "reason=session-ended: ok" in daemon.log()
    os.killpg(client.pid, signal.SIGKILL)
    print("leader exit to restore: %.3f s" % took)


def unshared_pid(daemon):
    """The pid of a daemon started by `unshare --fork` (which blocks SIGTERM itself)."""
    with open("/proc/%d/task/%d/children" % ((daemon.process.pid,) * 2)) as children:
        return int(children.read().split()[0])


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

# ---- Last: the clients that the shared and the hung daemon have held since they started, and
# the stopping daemon's end ----

def test_a_hung_gpu_answers_within_the_limits(hung):
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


def test_sigterm_while_a_restore_hangs_waits_its_bound_and_leaves_the_hold(stopping):
    node, daemon = stopping
    status, seconds = daemon.exited()
    assert status == 0 and 5 < seconds < 14, (status, seconds)  # the 10 s bound, not the hang
    left = [line for line in error_lines(daemon) if "GPU 0" in line]
    assert any("next daemon" in line for line in left), daemon.log()
    assert "0" in state_file(node)
    assert "Traceback" not in daemon.log()


def test_slow_client_gets_408(daemon):
    connection = daemon.slow_client
    connection.sock.settimeout(zeusd.HEADER_TIMEOUT_S + 5)
    error_of(connection.response(), 408)
    assert time.monotonic() - daemon.slow_client_since > zeusd.HEADER_TIMEOUT_S - 0.5
    assert connection.closed_by_peer()


# ---- Interoperability: the real Zeus clients (0.15 and 0.16) against the daemon ----

ZEUS_PYTHONS = {"0.15": os.environ.get("ZEUSD_TEST_ZEUS_0_15"),
                "0.16": os.environ.get("ZEUSD_TEST_ZEUS_0_16")}
# The flags each Zeus release needs: 0.16 (pip install zeus today) works with the defaults.
STREAM_FORMAT_OF = {"0.15": ("--stream-format", "all-devices"), "0.16": ()}
CPU_TICKS = {"intel-rapl:0": (1000000, 50.0), "intel-rapl:1": (7, 20.0)}

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
    clients = [subprocess.Popen([python, "-c", ZEUS_CLIENT, daemon.mode, address, token],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env) for token in tokens]
    outputs = []
    for client in clients:
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err.decode()[-3000:]
        outputs.append(json.loads(out.decode().strip().splitlines()[-1]))
    return outputs


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
    assert 40000 < out["cpu_power"]["power_mw"]["0"]["cpu_mw"] < 60000
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
    assert 15 < reading["cpu_power_w"]["1"]["cpu_w"] < 25
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
    result = subprocess.run([python, "-c", example], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert re.search(r"gpu_power_w=\{0: 76\.[0-9]+, 1: 120\.0\}", result.stdout.decode()), \
        result.stdout
