# The two commands of the README.
.PHONY: demo test test-fast bench proto

demo:   ## set up, start the server on the default model, stream a steered generation with readouts
	scripts/demo.sh

test:   ## set up, run the test suite
	scripts/test.sh

test-fast:  ## the inner loop: everything but the vLLM and slow tests
	scripts/test.sh -m "not vllm and not slow"

bench:  ## throughput tables (bench/results/): reference backend; vLLM backend; SAE training vs SAELens
	scripts/setup.sh && .venv/bin/python bench/reference_backend.py
	.venv/bin/python bench/vllm_backend.py
	.venv/bin/python bench/codebook_models.py
	scripts/saelens_env.sh && .venv/bin/python bench/sae_training.py

proto:  ## regenerate the stubs in client/rudder/v1 from proto/
	. .venv/bin/activate && scripts/gen_proto.sh
