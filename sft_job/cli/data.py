"""`sft-job data synth` and `sft-job data convert`: make training data with a chat model, and
move data between the formats the job reads.

    sft-job data synth --topics jobs/synth/topics.yaml --n 500 --out s3://b/data/interview.jsonl
    sft-job data convert data/alpaca.json s3://b/data/alpaca-chat.jsonl --to chat

Only typer and the standard library are imported here; the work (httpx, pydantic, numpy,
storage clients) is imported inside the commands so `sft-job --help` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from sft_job.errors import SpecError

data_app = typer.Typer(help="Make and convert training data.", no_args_is_help=True,
                       pretty_exceptions_enable=False, add_completion=False)

FORMATS = ("alpaca", "chat", "prompt-response")
_FMT_HELP = "Output format: alpaca, chat or prompt-response."


def _choice(value: str, choices: tuple[str, ...], flag: str) -> str:
    if value not in choices:
        raise SpecError(f"{flag} {value}: choose one of {', '.join(choices)}")
    return value


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise


def _workdir() -> Path:
    root = Path(os.environ.get("SFT_JOB_WORKDIR") or Path(tempfile.gettempdir()) / "sft-job")
    return root


def _read_text(uri: str, flag: str) -> str:
    from sft_job import storage
    from sft_job.uri import is_remote

    if is_remote(uri):
        return storage.read_text(uri)
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise SpecError(f"{flag} {uri}: no such file")
    return path.read_text(encoding="utf-8")


def _check_base_url(url: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SpecError(f"--base-url '{url}': no endpoint; give the server's http(s) URL, e.g. "
                        "https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (vLLM)")
    return url.strip()


# the options of `data synth`, one alias each (the command's signature is one line per option)
_Topics = Annotated[str, typer.Option(help="Topics YAML (path or bucket URI); see "
                                      "jobs/synth/topics.yaml.")]
_N = Annotated[int, typer.Option(min=1, help="Rows wanted in the output.")]
_Out = Annotated[str, typer.Option(help="Output file: path, s3://, gs:// or hf:// URI ending in "
                                   ".jsonl, .json, .parquet or .csv.")]
_Format = Annotated[str, typer.Option("--format", help=_FMT_HELP)]
_Model = Annotated[str, typer.Option(help="Model name the endpoint serves.")]
_BaseUrl = Annotated[str, typer.Option(envvar="OPENAI_BASE_URL", help="OpenAI-compatible API "
                                       "root (…/v1).")]
_KeyEnv = Annotated[str, typer.Option(help="Environment variable holding the API key.")]
_Template = Annotated[str | None, typer.Option(help="Prompt template file (path or URI); "
                                               "overrides the topics file's.")]
_System = Annotated[str | None, typer.Option(help="System message; overrides the topics "
                                             "file's.")]
_PerRequest = Annotated[int, typer.Option(min=1, help="Pairs asked for per request.")]
_Concurrency = Annotated[int, typer.Option(min=1, help="Requests in flight at once.")]
_Rpm = Annotated[float, typer.Option(min=0, help="Requests started per minute (0: no limit; "
                                     "429s are honoured anyway).")]
_Temperature = Annotated[float, typer.Option(min=0, help="Sampling temperature.")]
_MaxTokens = Annotated[int | None, typer.Option(min=1, help="max_tokens per answer (default: "
                                                "the server's).")]
_JsonMode = Annotated[str, typer.Option(help="Ask for response_format json_object: auto (drop "
                                        "it if the server refuses), on, off.")]
_MaxRequests = Annotated[int | None, typer.Option(min=1, help="Requests allowed in all "
                                                  "(default: 3x those needed).")]
_MaxRetries = Annotated[int, typer.Option(min=0, help="Retries per request on 429/5xx/"
                                          "timeouts.")]
_Timeout = Annotated[float, typer.Option(min=1, help="Seconds per request.")]
_MinChars = Annotated[int, typer.Option(min=1, help="Shortest prompt and response kept.")]
_MaxChars = Annotated[int, typer.Option(min=1, help="Longest row kept (prompt + input + "
                                        "response).")]
_NearDup = Annotated[float, typer.Option(min=0.5, max=1.0, help="Prompts this similar (Jaccard "
                                         "of character 5-grams) are duplicates; 1 = exact "
                                         "duplicates only.")]
_CheckpointSeconds = Annotated[float, typer.Option(min=1, help="Upload the journal this often "
                                                   "(bucket output).")]
_Stats = Annotated[Path | None, typer.Option(help="Also write the stats as JSON here.")]
_Restart = Annotated[bool, typer.Option(help="Discard an earlier run's journal and start over.")]


@data_app.command()
def synth(
    topics: _Topics,
    n: _N,
    out: _Out,
    format: _Format = "alpaca",
    model: _Model = "gpt-4o-mini",
    base_url: _BaseUrl = "https://api.openai.com/v1",
    key_env: _KeyEnv = "OPENAI_API_KEY",
    template: _Template = None,
    system: _System = None,
    per_request: _PerRequest = 5, concurrency: _Concurrency = 4, rpm: _Rpm = 0,
    temperature: _Temperature = 0.9, max_tokens: _MaxTokens = None,
    json_mode: _JsonMode = "auto",
    max_requests: _MaxRequests = None, max_retries: _MaxRetries = 6, timeout: _Timeout = 120,
    min_chars: _MinChars = 10, max_chars: _MaxChars = 8000, near_dup: _NearDup = 0.8,
    checkpoint_seconds: _CheckpointSeconds = 30, stats: _Stats = None, restart: _Restart = False,
) -> None:
    """Generate instruction/response pairs with any OpenAI-compatible chat endpoint.

    The API key comes from $OPENAI_API_KEY (see --key-env). Rerun the same command to
    continue an interrupted run: finished requests are never asked again."""
    _setup_logging()
    _choice(format, FORMATS, "--format")
    _choice(json_mode, ("auto", "on", "off"), "--json-mode")
    client = _client(key_env, base_url, model=model, temperature=temperature,
                     max_tokens=max_tokens, json_mode=json_mode, timeout=timeout,
                     max_retries=max_retries, rpm=rpm)

    from sft_job.synth.run import SynthConfig, stats_json, stats_line, synthesize
    from sft_job.synth.topics import DEFAULT_TEMPLATE, load_topics

    tf = load_topics(topics)
    cfg = SynthConfig(
        out=out, n=n, topics=tf.topic_list(), format=format,
        template=_read_text(template, "--template") if template else (tf.template or DEFAULT_TEMPLATE),
        system=system if system is not None else tf.system,
        per_request=per_request, concurrency=concurrency, max_requests=max_requests,
        min_chars=min_chars, max_chars=max_chars, near_dup=near_dup,
        checkpoint_seconds=checkpoint_seconds, restart=restart, workdir=_workdir(), client=client,
    )
    result = synthesize(cfg)
    if stats:
        stats.write_text(stats_json(result) + "\n", encoding="utf-8")
    typer.echo(stats_line(result))


def _client(key_env: str, base_url: str, **settings: Any) -> Any:
    """The endpoint's ClientSettings: the API key from $`key_env` (refused when unset, before
    anything is generated) and a checked base URL."""
    api_key = os.environ.get(key_env, "").strip()
    if not api_key:
        raise SpecError(f"{key_env} is not set: export the endpoint's API key (for a local "
                        "server without auth, any non-empty value); no data was generated")
    base_url = _check_base_url(base_url)
    from sft_job.synth.client import ClientSettings

    return ClientSettings(base_url=base_url, api_key=api_key, **settings)


@data_app.command()
def convert(
    src: Annotated[str, typer.Argument(metavar="IN", help="Data to read: file, folder or "
                                       "bucket URI/prefix (any kind `sft-job run` reads).")],
    dst: Annotated[str, typer.Argument(metavar="OUT", help="File to write (.jsonl, .json, "
                                       ".parquet, .csv): path or bucket URI.")],
    to: Annotated[str, typer.Option(help=_FMT_HELP)],
    from_: Annotated[str, typer.Option("--from", help="Input format: auto (detect), alpaca, "
                                       "chat or prompt-response.")] = "auto",
    prompt_field: Annotated[str, typer.Option(help="Input prompt field (prompt-response).")
                            ] = "prompt",
    response_field: Annotated[str, typer.Option(help="Input response field (prompt-response).")
                              ] = "response",
    messages_field: Annotated[str, typer.Option(help="Input messages field (chat).")
                              ] = "messages",
    on_error: Annotated[str, typer.Option(help="Rows that cannot be converted: fail (exit 2, "
                                          "nothing written) or skip (counted).")] = "fail",
    last_turn: Annotated[bool, typer.Option(help="Chat -> alpaca/prompt-response: keep the "
                                            "last exchange of multi-turn chats.")] = False,
) -> None:
    """Convert data between alpaca, chat and prompt-response, from/to any storage URI."""
    _setup_logging()
    _choice(to, FORMATS, "--to")
    _choice(from_, ("auto", *FORMATS), "--from")
    _choice(on_error, ("fail", "skip"), "--on-error")
    from sft_job.synth.convert import ConvertOptions
    from sft_job.synth.convert import convert as run_convert

    opts = ConvertOptions(to=to, from_=from_, prompt_field=prompt_field,
                          response_field=response_field, messages_field=messages_field,
                          on_error=on_error, last_turn=last_turn)
    s = run_convert(src, dst, opts, _workdir())
    typer.echo(f"convert: {s['rows']} rows {s['from']} -> {s['to']}: {s['in']} -> {s['out']} "
               f"(skipped {s['skipped']}, lossy {s['lossy']})")
