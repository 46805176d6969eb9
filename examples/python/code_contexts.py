# The Code Contexts snippet of the Code concept page, in Python: a Code
# Context keeps interpreter state alive across Code Runs, and a run can
# stream its stdout.
#
# Run it against a local server:
#   pip install -e sdk/python
#   export CROWNEST_API_KEY=cn_live_...            # crownest keys create --org demo --scopes all
#   export CROWNEST_BASE_URL=http://127.0.0.1:7420 # the default
#   python examples/python/code_contexts.py        # prints "42", then "ok"
import sys

from crownest import CrowNest

with CrowNest() as client:
    sandbox = client.sandboxes.create(template="python")
    try:
        context = sandbox.code.create_context(language="python")
        sandbox.code.run("value = 42", context_id=context.id)
        result = sandbox.code.run("print(value)", context_id=context.id, on_stdout=sys.stdout.write)
        print(result["error"] or "ok")
    finally:
        sandbox.kill()
