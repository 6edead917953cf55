// Imports the standard packages that notebook cells use most, so that building this
// fills the Go build cache the kernel starts from.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"container/heap"
	"container/list"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"math/big"
	"math/rand"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"
)

var (
	_ = bufio.NewReader
	_ = bytes.NewBuffer
	_ = cmp.Compare[int]
	_ = heap.Init
	_ = list.New
	_ = json.Marshal
	_ = errors.New
	_ = io.EOF
	_ = maps.Keys[map[int]int]
	_ = math.Sqrt
	_ = big.NewInt
	_ = rand.Intn
	_ = regexp.MustCompile
	_ = slices.Sort[[]int]
	_ = sort.Ints
	_ = strconv.Itoa
	_ = strings.Split
	_ = sync.Mutex{}
	_ = time.Now
	_ = unicode.IsLetter
	_ = utf8.RuneLen
)

func main() { fmt.Println(os.Args[0]) }
