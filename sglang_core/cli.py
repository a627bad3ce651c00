"""The ``sglang-core`` command: generate, serve, router, plugins, bench-latency, bench-offline."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from sglang_core.config import EngineSettings
from sglang_core.engine_args import engine_from_args


def cmd_generate(args: argparse.Namespace) -> int:
    engine = engine_from_args(args)
    try:
        params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        prompt = args.prompt
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                          add_generation_prompt=True)
        for chunk in engine.generate(prompt, params, stream=True):
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.shutdown()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from sglang_core.plugins import PluginManager

    manager = PluginManager(EngineSettings.from_args(args).plugins)
    rows = [
        {"name": i.name, "distribution": i.distribution, "version": i.version, "module": i.module,
         "loaded": i.loaded, "registered": i.registered, "error": i.error}
        for i in manager.infos
    ]
    if args.models:  # one served architecture a line, with the plugin that serves it
        for arch, plugin in sorted((a, r["name"]) for r in rows for a in r["registered"].get("models", [])):
            print(f"{arch}  {plugin}")
        return 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        status = "ok" if row["loaded"] else f"FAILED: {row['error']}"
        print(f"{row['name']}  ({row['distribution']} {row['version']}, {row['module']})  {status}")
        for kind, names in row["registered"].items():
            print(f"    {kind}: {', '.join(names)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sglang_core.server.serve import serve
    from sglang_core.server.settings import ServerSettings

    return serve(ServerSettings.from_args(args))


def cmd_router(args: argparse.Namespace) -> int:
    from sglang_core.router.standalone import StandaloneRouterSettings, run_router

    return run_router(StandaloneRouterSettings.from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglang-core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Callable[[argparse.Namespace], int], help_text: str,
                engine_flags: bool = True, settings: type[EngineSettings] = EngineSettings) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        if engine_flags:
            settings.add_arguments(p)
        p.set_defaults(func=fn)
        return p

    p = command("generate", cmd_generate, "print a completion of a prompt (default model)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")

    from sglang_core.server.settings import ServerSettings

    command("serve", cmd_serve, "serve the HTTP APIs (native and OpenAI-compatible)", settings=ServerSettings)

    from sglang_core.router.standalone import StandaloneRouterSettings

    command("router", cmd_router, "route requests over several `sglang-core serve` workers (data parallelism across "
            "processes or machines)", settings=StandaloneRouterSettings)

    p = command("plugins", cmd_plugins, "list installed plugins, what they register and load errors", False)
    p.add_argument("--plugins", default=None, help="comma-separated plugins to load (default: all installed)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--models", action="store_true", help="list only the model architectures served, with their plugins")

    from sglang_core.bench_serving import add_arguments as add_serving_arguments, cmd_bench_serving

    add_serving_arguments(command("bench-serving", cmd_bench_serving, "load a running server: throughput, TTFT, TPOT, ITL",
                                  engine_flags=False))

    from sglang_core.bench import add_bench_commands

    add_bench_commands(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: a clear message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
