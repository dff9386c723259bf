# data synth / data convert (sft_job/synth): tests against a fake OpenAI-compatible server and moto S3.

test-synth: venv ## Run the data synth/convert tests (fake OpenAI endpoint on 127.0.0.1, moto S3)
	$(BIN)/ruff check sft_job/synth tests/synth
	$(BIN)/python -m pytest tests/synth $(PYTEST_ARGS)

.PHONY: test-synth
