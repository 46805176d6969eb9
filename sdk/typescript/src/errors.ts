/** Base class of every error the SDK throws. */
export class CrowNestError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "CrowNestError";
  }
}

/**
 * The server answered with an error envelope
 * (`{"error": {"code", "message", "details"}}`): `status` is the HTTP
 * status, `code` the stable snake_case code, `message` the server's text.
 */
export class CrowNestApiError extends CrowNestError {
  readonly status: number;
  readonly code: string;
  readonly details: Record<string, unknown>;
  readonly requestId: string | null;

  constructor(
    status: number,
    code: string,
    message: string,
    details: Record<string, unknown> = {},
    requestId: string | null = null,
  ) {
    super(message);
    this.name = "CrowNestApiError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.requestId = requestId;
  }
}

/** The request could not be completed over the network (after retries). */
export class CrowNestConnectionError extends CrowNestError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "CrowNestConnectionError";
  }
}

/** A wait for something on the server (a Workspace Run to end, its
 * evidence to be written) ran past its timeout. */
export class CrowNestTimeoutError extends CrowNestError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "CrowNestTimeoutError";
  }
}

export async function apiErrorFromResponse(response: Response): Promise<CrowNestApiError> {
  const text = await response.text();
  const requestId = response.headers.get("x-request-id");
  try {
    const err = (JSON.parse(text) as { error: { code?: string; message?: string; details?: Record<string, unknown> } })
      .error;
    return new CrowNestApiError(
      response.status,
      err.code ?? `http_${response.status}`,
      err.message ?? "",
      err.details ?? {},
      requestId,
    );
  } catch {
    return new CrowNestApiError(
      response.status,
      `http_${response.status}`,
      text.trim() || `HTTP ${response.status}`,
      {},
      requestId,
    );
  }
}
