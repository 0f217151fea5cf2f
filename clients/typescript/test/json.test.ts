import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  InvalidArgumentError,
  LosslessNumber,
  parseJson,
  stringifyJson,
  UnrepresentableJsonError,
} from "../src/index.js";

describe("JSON values", () => {
  test("integers past 2^53 are read as bigints and written back unchanged", () => {
    const value = parseJson(
      '{"big":9007199254740993,"u64":18446744073709551615,"i64":-9223372036854775808}',
    );
    assert.deepEqual(value, {
      big: 9007199254740993n,
      u64: 18446744073709551615n,
      i64: -9223372036854775808n,
    });
    assert.equal(
      stringifyJson(value),
      '{"big":9007199254740993,"u64":18446744073709551615,"i64":-9223372036854775808}',
    );
  });

  test("numbers that print back the same are plain numbers", () => {
    assert.deepEqual(parseJson("[0.25,1.5e+300,42,-7]"), [0.25, 1.5e300, 42, -7]);
  });

  test("spellings a number would change are kept as their text", () => {
    const value = parseJson("[-0.0,1.0,1e400,0.10000000000000000001]") as LosslessNumber[];
    assert.ok(value.every((item) => item instanceof LosslessNumber));
    assert.equal(stringifyJson(value), "[-0.0,1.0,1e400,0.10000000000000000001]");
  });

  test("text with NUL, U+2028 and control characters survives", () => {
    const text = 'a\u0000b\u2028c\u2029d\u0001e"\\';
    assert.deepEqual(parseJson(stringifyJson({ text })), { text });
  });

  test("an integer past 2^53 held in a number is refused, not rounded", () => {
    assert.throws(
      () => stringifyJson({ n: 9007199254740993 }),
      (error: unknown) =>
        error instanceof UnrepresentableJsonError &&
        error instanceof InvalidArgumentError && // one family with the server's refusals
        error.path === "$.n" &&
        /bigint/.test(error.message),
    );
  });

  test("NaN, Infinity, undefined, functions and class instances are refused", () => {
    for (const bad of [Number.NaN, Infinity, undefined, () => 1, new Date(), new Map()]) {
      assert.throws(() => stringifyJson({ bad }), UnrepresentableJsonError);
    }
  });

  test("bigints outside the 64-bit range are refused", () => {
    assert.throws(() => stringifyJson(2n ** 64n), UnrepresentableJsonError);
    assert.throws(() => stringifyJson(-(2n ** 63n) - 1n), UnrepresentableJsonError);
    assert.equal(
      stringifyJson([2n ** 64n - 1n, -(2n ** 63n)]),
      "[18446744073709551615,-9223372036854775808]",
    );
  });

  test("a value that contains itself is refused", () => {
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    assert.throws(() => stringifyJson(cyclic), /contains itself/);
  });

  test("a LosslessNumber is written as its text, and only a JSON number can be one", () => {
    assert.equal(stringifyJson([new LosslessNumber("1.50")]), "[1.50]");
    assert.throws(() => new LosslessNumber("0x10"), /Invalid number/);
  });

  test("floats far past 2^53 written with an exponent are fine", () => {
    assert.equal(stringifyJson([1.5e300, 1e21]), "[1.5e+300,1e+21]");
  });
});
