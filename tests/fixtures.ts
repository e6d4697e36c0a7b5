/**
 * Locates the real model fixtures in ../shared/models (never copied into the repo). A missing
 * fixture fails the test with a message saying where it was looked for, never a silent pass.
 */

/** The fixtures folder: SPECDEC_MODELS, else ../shared/models beside the checkout. */
export const FIXTURES = Deno.env.get("SPECDEC_MODELS") ??
  new URL("../../shared/models/", import.meta.url).pathname;

/** The path of fixture `rel`; throws a clear error if it does not exist. */
export async function fixture(rel: string): Promise<string> {
  const path = `${FIXTURES.replace(/\/$/, "")}/${rel}`;
  try {
    await Deno.stat(path);
  } catch {
    throw new Error(
      `fixture missing: ${path} (the real models live in ../shared/models beside the checkout; ` +
        `set SPECDEC_MODELS to another folder that has them)`,
    );
  }
  return path;
}

/** The bytes of fixture `rel`. */
export async function fixtureBytes(rel: string): Promise<Uint8Array> {
  return await Deno.readFile(await fixture(rel));
}

/** The text of fixture `rel`. */
export async function fixtureText(rel: string): Promise<string> {
  return await Deno.readTextFile(await fixture(rel));
}
