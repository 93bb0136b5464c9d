"""``thinktalk serve DIR --replicas N``: N copies of the server behind one endpoint, on Ray Serve.

Each replica is the whole single-process server (:func:`thinktalk.serve.app.create_app` over its own
model and batching engine), deployed as a Ray Serve ASGI ingress; Ray's HTTP proxy is the one
OpenAI-compatible endpoint and spreads requests over the replicas. A realtime session is one WebSocket,
which the proxy forwards to one replica for its whole life, so the session's conversation (and its KV
rows) stays where it started. Every HTTP answer and realtime handshake names its replica
(``x-thinktalk-replica``), and
``/metrics`` (answered by one replica) adds ``thinktalk_replicas`` and ``thinktalk_replica_info{replica=...}``.

On GPUs each replica takes ``tensor_parallel_size`` GPUs (Ray places them); on a CPU machine replicas
share the cores. Several nodes: start a Ray cluster (``ray start --head`` / ``ray start --address``)
and run this where the head is; Ray places replicas on every node that has the resources.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("thinktalk.serve")
REPLICA_HEADER = "x-thinktalk-replica"


class ThinktalkReplica:
    """One replica: loads the model, then builds the app (Ray calls ``__serve_build_asgi_app__``)."""

    def __init__(self, directory: str, device: str, dtype, settings, tensor_parallel_size: int, replicas: int,
                 quant_kernel: str = "plain"):  # fmt: skip
        import torch

        from thinktalk.serve.server import load_for_serving

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // replicas))
        self.replicas = replicas
        self.replica_id = _replica_id()
        self.settings = settings
        self.model, self.processor = load_for_serving(directory, device, dtype, tensor_parallel_size, quant_kernel)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose tensor-parallel workers died is restarted."""
        driver = getattr(self.model, "tensor_parallel_driver", None)
        dead = driver.dead_ranks() if driver is not None else []
        if dead:
            raise RuntimeError(f"tensor-parallel ranks {dead} exited")

    def __serve_build_asgi_app__(self):
        from thinktalk.serve.app import create_app

        app = create_app(self.model, self.processor, self.settings)
        metrics = app.state.ctx.metrics
        metrics.gauge("thinktalk_replicas", lambda: _running_replicas(self.replicas))
        metrics.info("thinktalk_replica_info", {"replica": self.replica_id})
        app.state.ctx.extras["replica"] = self.replica_id  # named in the realtime handshake too
        replica = self.replica_id

        @app.middleware("http")
        async def _name_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Ray (tests of the class itself)
        return f"pid{os.getpid()}"


def _running_replicas(configured: int) -> int:
    try:
        from ray import serve

        return int(getattr(serve.get_replica_context(), "world_size", configured) or configured)
    except Exception:
        return configured


def deployment(directory: str, replicas: int, device: str, dtype, settings, tensor_parallel_size: int = 1,
               quant_kernel: str = "plain"):  # fmt: skip
    """The Ray Serve application (bound deployment) of ``replicas`` copies of the server."""
    from ray import serve

    gpus = tensor_parallel_size if device.startswith("cuda") else 0
    # CPU replicas ask for no Ray CPUs: they share the machine's cores (torch threads are split between them).
    options = {"num_cpus": 0, "num_gpus": gpus}
    wrapped = serve.deployment(
        serve.ingress()(ThinktalkReplica),
        name="thinktalk",
        num_replicas=replicas,
        ray_actor_options=options,
        # A replica handles many sessions at once (its engine batches them); realtime sessions are long.
        max_ongoing_requests=max(8, settings.max_sessions + settings.max_realtime_connections),
        health_check_period_s=10,
        graceful_shutdown_timeout_s=10,
    )
    return wrapped.bind(directory, device, dtype, settings, tensor_parallel_size, replicas, quant_kernel)


def serve_replicas(directory: str, replicas: int, host: str, port: int, device: str, dtype, log_level: str,
                   settings, tensor_parallel_size: int = 1, quant_kernel: str = "plain") -> int:  # fmt: skip
    """Start (or join, with ``$RAY_ADDRESS``) a Ray cluster, deploy the replicas, serve until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("thinktalk serve --replicas needs Ray Serve: pip install 'thinktalk[ray]'")
        return 2
    stop = []

    def _stop(signum, frame):
        stop.append(signum)

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level=log_level.upper(),
             log_to_driver=log_level == "debug")  # fmt: skip
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(directory, replicas, device, dtype, settings, tensor_parallel_size, quant_kernel),
                  name="thinktalk", route_prefix="/")  # fmt: skip
        print(f"thinktalk: serving {replicas} replicas of {directory} at http://{host}:{port}/ (Ray Serve)", flush=True)
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        while not stop:
            time.sleep(0.5)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
