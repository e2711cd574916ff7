"""The ``flywheel`` command.

flywheel up [--stack embedded|postgres+kafka] [--data-dir DIR] [--free-ports]
flywheel status [--data-dir DIR]
flywheel demo [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from flywheel.cli import admin, demo_loop
from flywheel.cli.services import GRPC_BASE_PORT, ServicePorts, plan_ports
from flywheel.cli.supervisor import Supervisor, gateway_ready, health_of, read_state
from flywheel.dataset import cli as dataset_cli
from flywheel.trainer import cli as trainer_cli
from flywheel.trainer import train_cli

STACKS = ("embedded", "postgres+kafka")


def _stack_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of the services: this process's, plus what the stack needs."""
    env = dict(os.environ)
    env.setdefault("FLYWHEEL_LOG_FORMAT", "json")
    if args.stack == "postgres+kafka":
        database_url = args.database_url or env.get("FLYWHEEL_DATABASE_URL")
        kafka = args.kafka_bootstrap or env.get("FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS")
        if not database_url or not kafka:
            raise SystemExit(
                "flywheel: --stack postgres+kafka needs --database-url (or "
                "FLYWHEEL_DATABASE_URL) and --kafka-bootstrap (or "
                "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS); deploy/local/postgres.sh and "
                "deploy/local/kafka.sh start local ones"
            )
        env.update(
            FLYWHEEL_DATABASE_URL=database_url,
            FLYWHEEL_EVENT_BUS="kafka",
            FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS=kafka,
        )
    else:
        for key in ("FLYWHEEL_DATABASE_URL", "FLYWHEEL_EVENT_BUS", "FLYWHEEL_EVENT_LOG_URL"):
            env.pop(key, None)
    return env


def _print_table(plan: dict[str, ServicePorts], statuses: dict[str, str]) -> None:
    print(f"{'service':<10} {'status':<14} {'grpc':>6} {'metrics':>8} {'http':>6}")
    for name, ports in plan.items():
        http = str(ports.http_port) if ports.http_port else "-"
        print(
            f"{name:<10} {statuses.get(name, '?'):<14} {ports.grpc_port:>6} "
            f"{ports.metrics_port:>8} {http:>6}"
        )


async def _start(
    args: argparse.Namespace, extra_env: dict[str, str] | None = None
) -> tuple[Supervisor, bool]:
    plan = plan_ports(free=args.free_ports)
    env = _stack_env(args) | (extra_env or {})
    supervisor = Supervisor(plan, env, args.data_dir.resolve())
    print(f"flywheel: starting {len(plan)} services ({args.stack}); data in {args.data_dir}")
    await supervisor.start_all()
    statuses = await supervisor.wait_healthy(args.timeout)
    _print_table(plan, statuses)
    healthy = all(v == "SERVING" for v in statuses.values())
    if healthy:
        # The gateway's readiness is the view a client has: every service reachable from it.
        http_port = plan["gateway"].http_port
        assert http_port is not None
        code, body = await gateway_ready(http_port)
        print(f"gateway /readyz: HTTP {code} {body}")
        healthy = code == 200
    if not healthy:
        print(
            f"flywheel: not every service became healthy; logs in {args.data_dir / 'logs'}",
            file=sys.stderr,
        )
    return supervisor, healthy


async def cmd_up(args: argparse.Namespace) -> int:
    """Start every service and supervise them until Ctrl-C."""
    _stack_env(args)  # a bad stack setting fails now, not after minutes of model building
    base_model = await asyncio.to_thread(_base_model, args)
    supervisor, healthy = await _start(args, _model_env(base_model))
    if not healthy:
        await supervisor.stop_all()
        return 1
    gateway = supervisor.services["gateway"].ports
    print(f"flywheel: gateway on http://127.0.0.1:{gateway.http_port}  (Ctrl-C stops)")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.stopping.set)
    await supervisor.supervise()
    print("flywheel: stopping")
    await supervisor.stop_all()
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    """Show the health of the services of a running ``flywheel up``."""
    state = read_state(args.data_dir.resolve())
    if state is None:
        print(f"flywheel: nothing running (no state in {args.data_dir})", file=sys.stderr)
        return 1
    services = state["services"]
    assert isinstance(services, dict)
    plan = {
        name: ServicePorts(name, s["grpc_port"], s["metrics_port"], s.get("http_port"))
        for name, s in services.items()
    }
    statuses = await health_of({n: p.grpc_port for n, p in plan.items()})
    _print_table(plan, statuses)
    return 0 if all(v == "SERVING" for v in statuses.values()) else 1


def _base_model(args: argparse.Namespace) -> str:
    """The base model the stack serves and trains on: ``--base-model``, else
    ``FLYWHEEL_INFERENCE_BASE_MODEL``, else the bootstrap model (built the first time, a
    few CPU minutes; cached under the data folder after that)."""
    if args.base_model:
        return str(args.base_model.resolve())
    if os.environ.get("FLYWHEEL_INFERENCE_BASE_MODEL"):
        return os.environ["FLYWHEEL_INFERENCE_BASE_MODEL"]
    from flywheel.trainer.bootstrap import bootstrap_model

    root = args.data_dir.resolve() / "models"
    print(f"flywheel: base model from `flywheel bootstrap-model` (cached in {root})")
    return str(bootstrap_model(root))


def _model_env(base_model: str) -> dict[str, str]:
    """What tells the services the base model: the inference engine serves it."""
    return {"FLYWHEEL_INFERENCE_BASE_MODEL": base_model}


async def cmd_demo(args: argparse.Namespace) -> int:
    """Start every service, check each is healthy, turn the loop once, and shut down."""
    _stack_env(args)  # a bad stack setting fails now, not after minutes of model building
    base_model = await asyncio.to_thread(_base_model, args)
    env = demo_loop.DEMO_POLICY | _model_env(base_model)
    env["FLYWHEEL_POLICY_BASE_MODEL"] = base_model
    supervisor, healthy = await _start(args, env)
    turned = False
    try:
        if healthy:
            ports = {name: s.ports for name, s in supervisor.services.items()}
            turned = await demo_loop.run_loop(
                f"http://127.0.0.1:{ports['gateway'].http_port}",
                f"127.0.0.1:{ports['feedback'].grpc_port}",
                f"127.0.0.1:{ports['dataset'].grpc_port}",
                f"127.0.0.1:{ports['trainer'].grpc_port}",
                f"127.0.0.1:{ports['inference'].grpc_port}",
            )
    finally:
        await supervisor.stop_all()
    if not healthy:
        print("flywheel demo: FAILED (not every service was healthy)")
    elif not turned:
        print(f"flywheel demo: FAILED (the loop did not turn; logs in {args.data_dir / 'logs'})")
    else:
        print(
            "flywheel demo: every service was healthy, and feedback became a training request,"
            " an adapter, hot-loaded, A/B-tested, rated and promoted"
        )
    return 0 if healthy and turned else 1


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            type=Path,
            default=Path(os.environ.get("FLYWHEEL_DATA_DIR", ".flywheel/data")),
            help="databases, event log, artifacts, logs (default: .flywheel/data)",
        )

    for name, help_text in (
        ("up", "start every service and supervise them until Ctrl-C"),
        ("demo", "start every service, check health, shut down"),
    ):
        p = sub.add_parser(name, help=help_text)
        common(p)
        p.add_argument("--stack", choices=STACKS, default="embedded")
        p.add_argument("--database-url", help="PostgreSQL URL for --stack postgres+kafka")
        p.add_argument("--kafka-bootstrap", help="Kafka host:port for --stack postgres+kafka")
        p.add_argument(
            "--free-ports", action="store_true", help="pick free ports instead of the defaults"
        )
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health")
        p.add_argument(
            "--base-model", type=Path,
            help="model folder to serve and train on (default: FLYWHEEL_INFERENCE_BASE_MODEL, "
            "else the bootstrap model, built once and cached in the data folder)",
        )  # fmt: skip
    common(sub.add_parser("status", help="show the health of running services"))
    admin.add_parsers(sub, f"127.0.0.1:{GRPC_BASE_PORT + 2}")
    dataset_cli.add_parser(sub)
    trainer_cli.add_parser(sub)
    train_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``flywheel`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "tenant":
        return asyncio.run(admin.create_tenant(args.feedback, args.tenant_id, args.name))
    if args.command == "key":
        return asyncio.run(admin.create_key(args.feedback, args.tenant, args.role, args.name))
    if args.command == "dataset":
        return dataset_cli.run(args)
    if args.command == "train":
        return train_cli.run(args)
    if args.command == "bootstrap-model":
        return trainer_cli.run(args)
    command = {"up": cmd_up, "status": cmd_status, "demo": cmd_demo}[args.command]
    return asyncio.run(command(args))


if __name__ == "__main__":
    sys.exit(main())
