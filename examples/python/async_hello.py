# The async example of the Python SDK docs.
#
# Run it against a local server:
#   pip install -e sdk/python
#   export CROWNEST_API_KEY=cn_live_...            # crownest keys create --org demo --scopes all
#   export CROWNEST_BASE_URL=http://127.0.0.1:7420 # the default
#   python examples/python/async_hello.py          # prints "0 42"
import asyncio

from crownest import AsyncCrowNest


async def main() -> None:
    async with AsyncCrowNest() as client:
        sandbox = await client.sandboxes.create(template="python")
        result = await sandbox.commands.run("python -c 'print(40 + 2)'")
        print(result["exitCode"], result["stdout"])
        await sandbox.kill()


asyncio.run(main())
