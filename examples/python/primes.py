# The worked example of the Python SDK docs: create a sandbox, write a
# script, run it, export its output as an artifact, clean up.
#
# Run it against a local server (see the README's "Python and TypeScript SDKs"):
#   pip install -e sdk/python
#   export CROWNEST_API_KEY=cn_live_...            # crownest keys create --org demo --scopes all
#   export CROWNEST_BASE_URL=http://127.0.0.1:7420 # the default
#   python examples/python/primes.py
from crownest import CrowNest

SCRIPT = """
with open("primes.txt", "w") as f:
    primes = [n for n in range(2, 50)
              if all(n % d for d in range(2, n))]
    f.write("\\n".join(map(str, primes)))
print("wrote", "primes.txt")
"""

with CrowNest() as client:
    sandbox = client.sandboxes.create(
        template="python",
        ttl_ms=10 * 60 * 1000,
        metadata={"job": "primes-demo"},
    )
    try:
        sandbox.files.write("primes.py", SCRIPT)
        result = sandbox.commands.run("python primes.py")
        print("exit code:", result["exitCode"])
        print(result["stdout"])

        artifact = sandbox.artifacts.create(path="primes.txt")
        data = client.artifacts.download(artifact["id"])
        print(data.decode())
    finally:
        sandbox.kill()
