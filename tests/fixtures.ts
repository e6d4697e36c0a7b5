/**
 * Locates the real model fixtures in ../shared/models (never copied into the repo). A missing
 * fixture fails the test with a message saying where it was looked for, never a silent pass.
 * Also the shared assertion for parser errors.
 */
import assert from "@specdec/assert";
import { FormatError } from "../models/types.ts";

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

/** Asserts that `fn` throws a FormatError whose message starts with `file` and matches `what`. */
export function assertFormatError(
  fn: () => unknown,
  file: string,
  what: RegExp,
  label = file,
): void {
  try {
    fn();
  } catch (e) {
    checkFormatError(e, file, what, label);
    return;
  }
  assert.fail(`${label}: no error`);
}

/** Like {@linkcode assertFormatError} for a function returning a promise. */
export async function assertFormatErrorAsync(
  fn: () => unknown,
  file: string,
  what: RegExp,
  label = file,
): Promise<void> {
  try {
    await fn();
  } catch (e) {
    checkFormatError(e, file, what, label);
    return;
  }
  assert.fail(`${label}: no error`);
}

function checkFormatError(e: unknown, file: string, what: RegExp, label: string): void {
  if (!(e instanceof FormatError)) {
    throw new Error(`${label}: expected a FormatError, got ${(e as Error)?.name}: ${e}`);
  }
  assert.ok(e.message.startsWith(`${file}: `), `${label}: message lacks ${file}: ${e.message}`);
  assert.match(e.message, what, label);
}
