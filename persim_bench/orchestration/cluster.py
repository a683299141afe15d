"""Connecting to Ray and checking, before any trial starts, that every node sees the shared stores.

On a multi-node cluster the datasets, policies (under ``--results``) and Tune's state (under
``--storage``) must be one store all nodes share: an NFS/EFS path or, for ``--storage``, a
cloud URI (s3://, gs://). A path that is only local to the driver would let trials start and
fail one by one on other nodes; a probe file written by the driver and read back on every node
turns that into one clear error up front.
"""
from __future__ import annotations

import socket
import uuid

from persim_bench.errors import ClusterError

PROBE_NAME = ".persim-bench-probe"


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a host:port nobody answers (ray.init would wait minutes for the GCS)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address}: expected local, auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ClusterError(f"cannot reach Ray at --address {address}: {err}") from None


def connect_ray(address: str) -> None:
    """``local`` starts a new Ray on this machine (even with ``RAY_ADDRESS`` set); anything else (``auto``,
    ``host:port``, ``ray://...``) attaches. Ray's INFO lines only at ``-v`` (``reporting.ray_logging_level``)."""
    import ray

    from persim_bench.orchestration.reporting import ray_logging_level

    if ray.is_initialized():
        return
    if address not in ("local", "auto"):
        check_reachable(address)
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, logging_level=ray_logging_level(),
                     configure_logging=True)
        else:
            ray.init(address=address, logging_level=ray_logging_level())
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot reach Ray at --address {address}: {str(err).splitlines()[0]}")


def filesystem_of(location: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    from pyarrow import fs

    if "://" in location:
        return fs.FileSystem.from_uri(location)
    return fs.LocalFileSystem(), location


def _read_probe(location: str) -> str:
    filesystem, path = filesystem_of(location)
    with filesystem.open_input_stream(f"{path.rstrip('/')}/{PROBE_NAME}") as stream:
        return stream.read().decode()


def check_shared_storage(locations: dict[str, str]) -> None:
    """Write a token into every store and read it back on every alive node; ClusterError naming what fails.

    ``locations`` maps a label (``--results``, ``--storage``) to a path or URI.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tokens = {}
    for label, location in locations.items():
        token = uuid.uuid4().hex
        try:
            filesystem, path = filesystem_of(location)
            filesystem.create_dir(path, recursive=True)
            with filesystem.open_output_stream(f"{path.rstrip('/')}/{PROBE_NAME}") as stream:
                stream.write(token.encode())
        except Exception as err:  # any store's own error type: report it, do not start trials
            raise ClusterError(f"{label} {location}: cannot write there: {err}") from None
        tokens[label] = token

    probe = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    for node in nodes:
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        for label, location in locations.items():
            try:
                seen = ray.get(probe.options(scheduling_strategy=strategy).remote(location), timeout=120)
            except Exception as err:
                seen = f"error: {str(err).strip().splitlines()[-1]}"
            if seen != tokens[label]:
                raise ClusterError(f"{label} {location} is not shared with Ray node "
                                 f"{node['NodeManagerAddress']} ({node['NodeID'][:8]}): it read {seen!r}; give a "
                                 f"path or URI every node mounts (see docs/cluster.md)")
